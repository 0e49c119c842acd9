"""Run one experiment: a matrix of verifiers x drafters over a prompt set, one loaded model.

The path of a run: plan.py turns the config into cells; references.py supplies the untimed
greedy continuations (fidelity, replays); every verifier is built (verifiers/, reference first)
and held for the whole run; then the timed visits run in plan.schedule's order (repeat by
repeat, batch size by batch size, cells shuffled within each), cell.py timing each cell's prompts once per visit and
appending rows (rows.py) to the resumable store; at the end rows are exported and summarised
(summary.py) in the same directory.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from quasar_kernels.reference import cpu_packed, pack_min_rows

from . import data
from .calibration import check_disjoint
from .cell import capture_graphs, run_cell
from .decode import OneSequence
from .errors import QuasarError
from .fileio import cache_root
from .fingerprint import code_fingerprint, model_fingerprint, prompts_fingerprint
from .models import LoadedModel, load_model, pick_device
from .plan import batch_sizes, cell_hash, plan_cells, repeats, schedule, validate
from .references import References, draft_tools
from .runtime import compile_elementwise, fused_attention
from .store import ResultStore, environment
from .verifiers import build_verifier, precision

log = logging.getLogger(__name__)
_MODEL_CACHE: dict[str, LoadedModel] = {}  # a -m sweep on the basic launcher reuses the model


def get_model(cfg) -> LoadedModel:
    key = cell_hash(cfg.model)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time in memory
        log.info("loading model %s (%s)", cfg.model.name, key)
        _MODEL_CACHE[key] = load_model(cfg.model)
    else:
        log.info("reusing loaded model %s (%s)", cfg.model.name, key)
    return _MODEL_CACHE[key]


# Where `auto` turns a speed switch on: fused projections pay on both (H100: results/gpu/step_speed*.md;
# 2-core CPU: SmolLM2 step 93 -> 76 ms at 1 token, 109 -> 90 ms at 6); compiling and the Triton
# attention kernels only on CUDA (on CPU compiling costs more than it saves; Triton needs CUDA).
AUTO_ON = {"fuse_projections": ("cuda", "cpu"), "compile_elementwise": ("cuda",), "fused_attention": ("cuda",)}


def on_cuda_by_default(cfg, key: str, runtime) -> bool:
    """A speed switch (fuse_projections, compile_elementwise, fused_attention): true, false, or auto
    (on for the device types in AUTO_ON). Each computes the same function as the unfused path."""
    value = cfg[key]
    if value not in (True, False, "auto"):
        raise QuasarError(f"{key}={value!r}; choose auto, true or false")
    return runtime.device.type in AUTO_ON[key] if value == "auto" else bool(value)


def teacher_forcing(cfg, fidelity_wanted: bool) -> bool:
    """Whether drafting cells of non-reference verifiers also measure τ_tf (cell.py): true, false,
    or auto (when fidelity is measured and decoding is greedy: the reference's continuation is its
    greedy output, so at temperature > 0 there is no one text to hold a verifier to)."""
    value = cfg.get("teacher_forced", "auto")
    if value not in (True, False, "auto"):
        raise QuasarError(f"teacher_forced={value!r}; choose auto, true or false")
    if value is True and float(cfg.temperature) > 0:
        raise QuasarError(f"teacher_forced=true follows the reference's greedy continuation; it needs temperature=0 "
                          f"(got {cfg.temperature}), or teacher_forced=false")
    return bool(fidelity_wanted and float(cfg.temperature) == 0) if value == "auto" else bool(value)


def check_model_label(store: ResultStore, label: str, weights: str) -> None:
    """Refuse to store rows of other weights under a model label the result set already uses."""
    if not (store.root / "manifest.json").exists():
        return
    for cfg in store.cells().values():
        if cfg.get("model_label") == label and cfg.get("weights") not in (None, weights):
            raise QuasarError(f"{store.root} holds rows of model {label!r} with other weights ({cfg['weights']} vs "
                              f"{weights} now); name this model model.name=<another name> or pick another out_dir=")


@dataclass
class LiveVerifier:
    """A verifier built for the run and held until its end: the cells of every verifier interleave
    (plan.schedule), so each is built once, not once per visit. Holds what its cells reuse across
    visits: the batch runtimes, the drafters (built once per verifier and drafter config, so a
    model-based drafter is not rebuilt every repeat) and the cells' descriptions."""
    vcfg: object
    runtime: object
    fidelity: dict
    is_reference: bool
    # every forward width its cells make (verify steps; drafters' branch forwards, decode.run_branches):
    # what batched graphs capture
    widths: tuple = ()
    packed: bool = False  # batch_packed: batched forwards run their linears on real tokens only
    pack_bucket: int = 32  # batch_pack_bucket
    batches: dict = field(default_factory=dict)  # batch size -> BatchRuntime
    drafters: dict = field(default_factory=dict)  # cell_hash(drafter config) -> Drafter
    cells: dict = field(default_factory=dict)  # (cell_hash(drafter config), batch size) -> rows.Cell

    @property
    def label(self) -> str:
        return self.vcfg.get("label") or self.vcfg.name

    @property
    def key(self) -> str:  # labels may repeat (two int4 settings); configs do not
        return cell_hash(self.vcfg)

    def batch_runtime(self, size: int):
        """The verifier as a batch of `size` sequences (decode.generate_batch), made once per
        size; on CUDA its verify forwards replay graphs captured here, untimed."""
        if size == 1:
            return OneSequence(self.runtime)
        if size not in self.batches:
            from .batching import BatchRuntime

            batch = BatchRuntime(self.runtime, size, packed=self.packed, pack_bucket=self.pack_bucket)
            graphs = getattr(self.runtime, "graphs", None)
            if graphs is not None:
                # verify steps and drafters' branch forwards are batched; other drafter forwards run
                # per sequence, eagerly
                widths = self.widths or range(1, graphs.max_tokens + 1)
                batch.enable_cuda_graphs(max(widths), graphs.max_len)
                batch.reset(batch.graphs.max_len)
                log.info("capturing batch-%d CUDA graphs", size)
                batch.graphs.capture_all(widths)
            self.batches[size] = batch
        return self.batches[size]

    def release(self) -> None:
        for batch in self.batches.values():
            if hasattr(batch, "release"):
                batch.release()
        if hasattr(self.runtime, "release"):
            self.runtime.release()
        self.batches, self.drafters, self.runtime = {}, {}, None


class Experiment:
    def __init__(self, cfg):
        validate(cfg)
        self.cfg = cfg
        self.plan = plan_cells(cfg)
        ds = cfg.dataset
        self.prompts = data.load_prompts(ds.name, ds.path, ds.categories, ds.limit, ds.per_category, int(ds.seed))
        log.info("prompts: %d from %s (%s)", len(self.prompts), ds.name, data.category_counts(self.prompts))
        if ds.per_category:
            short = {c: n for c, n in Counter(p.category for p in self.prompts).items() if n < ds.per_category}
            if short:  # the per-category balance the user asked for does not hold: say so
                log.warning("dataset.per_category=%d: these categories hold fewer prompts and give all they have: %s",
                            ds.per_category, ", ".join(f"{c} {n}" for c, n in sorted(short.items())))
        check_disjoint(self.prompts)  # never evaluate on the text that calibration and drafter searches fit on
        self.out_dir = Path(cfg.out_dir)
        self.store = ResultStore(self.out_dir)
        # Rows that must never be pooled: another experiment, token budget, seed or device kind.
        self.identity = {"experiment": cfg.experiment_name, "max_new_tokens": int(cfg.max_new_tokens),
                         "seed": int(cfg.seed), "device": pick_device(cfg.model.device).type}
        self.store.check_identity(self.identity)
        self.store_open = False
        # the cells this run visits, stored ones included: the store may also hold cells of earlier
        # runs under other contexts (another code version, prompts, settings), which tools
        # tabulating this run's cells alone leave out
        self.cell_ids: set[str] = set()

    def open_store(self):
        if not self.store_open:
            self.store.open({"identity": self.identity, "config": OmegaConf.to_container(self.cfg, resolve=True)})
            self.store_open = True

    def run(self) -> Path:
        t0 = time.perf_counter()
        cfg = self.cfg
        try:
            self.loaded = get_model(cfg)
            if max(batch_sizes(cfg)) > 1 and not getattr(self.loaded.runtime, "is_native", False):
                raise QuasarError(f"batch_size={cfg.batch_size} needs the native runtime (llama/qwen2/qwen3/mistral); "
                                  f"model {self.loaded.name} runs on the generic transformers path: use batch_size=1")
            # The speed switches act on the native runtime only; rows record what was applied.
            native = getattr(self.loaded.runtime, "is_native", False)
            self.fuse = on_cuda_by_default(cfg, "fuse_projections", self.loaded.runtime) and native
            self.engine = {"fuse_projections": self.fuse,
                           "compile_elementwise": on_cuda_by_default(cfg, "compile_elementwise", self.loaded.runtime)
                           and native,
                           "fused_attention": on_cuda_by_default(cfg, "fused_attention", self.loaded.runtime) and native,
                           # CPU fp32 products on oneDNN-packed weights (QUASAR_CPU_PACKED): another
                           # summation order, which GPTQ and W8A8 results follow, so part of the identity
                           "cpu_packed_linears": self.loaded.runtime.device.type == "cpu" and cpu_packed()}
            if self.engine["cpu_packed_linears"]:  # from how many rows (measured per host unless set)
                self.engine["cpu_pack_min_rows"] = pack_min_rows()
            compile_elementwise(self.engine["compile_elementwise"])
            fused_attention(self.engine["fused_attention"])
            self.tools = draft_tools(self.loaded, cache_root(cfg.model.cache_dir), self.fuse)
            # What a cell's identity holds beyond its config: the weights actually loaded, the code
            # that ran and the prompts' text (a changed file under the same path is another cell).
            self.identity_parts = {"weights": model_fingerprint(self.loaded), "code": code_fingerprint(),
                                   "prompts": prompts_fingerprint(self.prompts)}
            self.env = environment()
            check_model_label(self.store, self.loaded.name, self.identity_parts["weights"])
            verifiers = [v for v, _ in self.plan]
            drafters = {cell_hash(d): d for _, ds in self.plan for d in ds}.values()
            fidelity_wanted = cfg.fidelity is True or (
                cfg.fidelity == "auto" and any(not precision(v.name).is_reference for v in verifiers))
            self.teacher_forced = teacher_forcing(cfg, fidelity_wanted)
            self.references = References(self.loaded, self.prompts, int(cfg.max_new_tokens))

            # Every cell the loaded model cannot run is known before references and verifier builds.
            self.skipped, made = self.drop_unsupported(drafters)
            if fidelity_wanted or self.teacher_forced or any(d.replays == "reference" for d in made):
                self.references.compute(fidelity_wanted, cfg.progress)
            verify_tokens = max(d.k for d in made) + 1
            # CUDA graphs cover every forward a cell makes: verify steps, and any wider forward a
            # drafter runs on the verifier (lookahead's Jacobi window)
            widths = sorted(set(range(1, verify_tokens + 1)) | {d.forward_tokens for d in made if d.forward_tokens})
            self.live = [self.build_live(vcfg, widths) for vcfg, _ in self.plan]
            visits = schedule(self.plan, batch_sizes(cfg), repeats(cfg), int(cfg.seed))
            self.outputs = {}  # cell_id -> {(prompt_id, turn): output ids}: every repeat must give the same
            self.progress = {"done": 0, "total": len(visits), "start": time.perf_counter()}
            log.info("setup (model, references, drafters, verifiers) took %.0f s; %d cells x %d repeats to run, "
                     "shuffled within each repeat and batch size (seed %d)", self.progress["start"] - t0,
                     len(visits) // repeats(cfg), repeats(cfg), int(cfg.seed))
            for repeat, vi, size, dcfg in visits:
                live, t1 = self.live[vi], time.perf_counter()
                run_cell(self, live, dcfg, size, repeat)
                self.log_progress(f"{live.label}/{dcfg.get('label') or dcfg.name}" + (f"/B={size}" if size > 1 else "")
                                  + f" repeat {repeat}", time.perf_counter() - t1)
            self.release_verifiers()
            return self.finish(time.perf_counter() - t0)
        finally:
            self.release_verifiers()
            self.store.close()

    def build_live(self, vcfg, widths: list[int]) -> LiveVerifier:
        """Build a verifier (cached builds load from disk), measure its fidelity against the
        reference, and capture its CUDA graphs, before any timing."""
        runtime = build_verifier(self.loaded, vcfg, cache_root(self.cfg.model.cache_dir), self.fuse)
        fidelity = self.references.fidelity(runtime) if self.references.logprobs else {}
        capture_graphs(runtime, self.cfg, widths)
        return LiveVerifier(vcfg, runtime, fidelity, precision(vcfg.name).is_reference, widths=tuple(widths),
                            packed=bool(self.cfg.get("batch_packed", False)),
                            pack_bucket=int(self.cfg.get("batch_pack_bucket", 32)))

    def release_verifiers(self) -> None:
        for live in getattr(self, "live", []):
            live.release()
        self.live = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def drop_unsupported(self, drafters) -> list[str]:
        """Cells the loaded model cannot run (a precision that needs the native runtime, a drafter
        whose settings do not fit this model), found by instantiating each drafter once and asking
        each precision: refused together in one line, or with skip_unsupported=true dropped from
        the plan. Returns ("verifier/drafter: reason" per skipped cell, the drafters of the cells
        that run, instantiated)."""
        from .drafters import make_drafter

        bad_d, made = {}, {}
        for d in drafters:
            try:
                made[cell_hash(d)] = make_drafter(d, self.loaded.runtime, self.loaded, self.tools)
            except QuasarError as e:
                bad_d[cell_hash(d)] = str(e)
        skipped, plan = [], []
        for v, ds in self.plan:
            v_reason = precision(v.name).unsupported(self.loaded, v)
            keep = []
            for d in ds:
                reason = v_reason or bad_d.get(cell_hash(d))
                if reason:
                    skipped.append(f"{v.get('label') or v.name}/{d.get('label') or d.name}: {reason}")
                else:
                    keep.append(d)
            if keep:
                plan.append((v, keep))
        kept = [made[h] for h in {cell_hash(d) for _, ds in plan for d in ds}]
        if not skipped:
            return [], kept
        if self.cfg.skip_unsupported is not True:
            if self.cfg.skip_unsupported is not False:
                raise QuasarError(f"skip_unsupported={self.cfg.skip_unsupported!r}; choose true or false")
            raise QuasarError(f"{len(skipped)} of {self.plan_size()} cells cannot run on model {self.loaded.name}: "
                              + " | ".join(skipped) + " -- drop them from the matrix, or skip_unsupported=true "
                              "runs the rest")
        if not plan:
            raise QuasarError(f"no cell of the matrix can run on model {self.loaded.name}: " + " | ".join(skipped))
        for line in skipped:
            log.warning("skipped (skip_unsupported=true): %s", line)
        self.plan = plan
        return skipped, kept

    def plan_size(self) -> int:
        return sum(len(ds) for _, ds in self.plan)

    def log_progress(self, label: str, cell_s: float) -> None:
        """One line per finished visit of a cell: i of n, its time, and the time left at the mean pace so far."""
        p = self.progress
        p["done"] += 1
        elapsed = time.perf_counter() - p["start"]
        left = elapsed / p["done"] * (p["total"] - p["done"])
        log.info("cell %d/%d %s: %.0f s (cells so far %.0f s, ~%.0f s left)", p["done"], p["total"], label, cell_s,
                 elapsed, left)

    def finish(self, wall_s: float) -> Path:
        from .summary import crossovers, format_table, run_stall_warning, summarize

        if not self.store_open and not (self.out_dir / "manifest.json").exists():
            raise QuasarError("nothing was run: the matrix is empty")
        df = self.store.load()
        summary = summarize(df, float(self.cfg.get("min_exact_match", 0.5)))
        self.store.export(df, summary)
        if self.cfg.logger is not None and self.cfg.logger.get("name") == "wandb":
            from .wandb_logger import log_results

            log_results(self.cfg, df, summary, self.out_dir)
        print(format_table(summary))
        for line in crossovers(summary, float(self.cfg.get("tie_margin", 0.0))):
            print(line)
        if line := run_stall_warning(df):
            print(line)
        print(f"\nresults: {self.out_dir.resolve()}  (rows.parquet, rows.csv, summary.csv)")
        for line in getattr(self, "skipped", []):
            print(f"skipped cell (skip_unsupported=true): {line}")
        print(f"wall time: {wall_s:.1f} s")
        return self.out_dir
