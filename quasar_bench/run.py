"""Run one experiment: a matrix of verifiers x drafters over a prompt set, one loaded model.

Rows go to a resumable ResultStore (one parquet file per finished prompt); at the end the rows are
exported as rows.parquet / rows.csv and summarised into summary.csv in the same directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import data
from .decode import generate
from .drafters import drafter_names, make_drafter
from .errors import QuasarError
from .fidelity import logit_fidelity, match_metrics, teacher_forced_logprobs
from .metrics import alpha, per_position_acceptance, tau
from .models import LoadedModel, load_model
from .store import ResultStore, environment, git_commit

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
REFERENCE = "reference"
_MODEL_CACHE: dict[str, LoadedModel] = {}  # a -m sweep on the basic launcher reuses the model


# -- configuration ------------------------------------------------------------------------------
def group_config(group: str, entry) -> DictConfig:
    """A matrix entry is a config name (`ngram`) or a mapping with `name` plus overrides."""
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = OmegaConf.create(OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry)
    name = entry.get("name")
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise QuasarError(f"unknown {group} {name!r}; choose one of {', '.join(choices)}")
    return OmegaConf.merge(OmegaConf.load(path), entry)


def matrix(cfg, group: str, single: str, listed: str, entries=None) -> list[DictConfig]:
    chosen = cfg.get(single)
    if entries is None:
        entries = [chosen] if chosen is not None else list(cfg.matrix[listed])
    if not entries:
        raise QuasarError(f"matrix.{listed} is empty; name at least one {group}")
    out = [group_config(group, e) for e in entries]
    names = [c.name for c in out]
    if len(set(map(cell_hash, out))) != len(out):
        raise QuasarError(f"matrix.{listed} lists the same {group} twice: {names}")
    return out


def drafter_configs(cfg, entries=None) -> list[DictConfig]:
    out = matrix(cfg, "drafter", "drafter", "drafters", entries)
    for d in out:
        if d.name not in drafter_names():
            raise QuasarError(f"drafter config {d.name} has no module quasar_bench/drafters/{d.name}.py")
        if cfg.get("k") is not None and d.name != "ar":
            d.k = int(cfg.k)
        if d.name != "ar" and int(d.get("k", 1)) < 1:
            raise QuasarError(f"k={d.k} is impossible for drafter {d.name}: k must be >= 1 (e.g. k=5)")
    # AR first: it is the baseline, and with the reference verifier it is the reference continuation.
    return sorted(out, key=lambda d: d.name != "ar")


def verifier_configs(cfg, entries=None) -> list[DictConfig]:
    out = matrix(cfg, "verifier", "verifier", "verifiers", entries)
    return sorted(out, key=lambda v: v.name != REFERENCE)


def plan_cells(cfg) -> list[tuple[DictConfig, list[DictConfig]]]:
    """(verifier, drafters) to run: the product matrix.verifiers x matrix.drafters, plus each
    `matrix.extra` block ({verifiers: [...], drafters: [...]}: more drafters for some verifiers).
    `drafter=` / `verifier=` on the command line narrow the run to the product alone."""
    plan = [(v, drafter_configs(cfg)) for v in verifier_configs(cfg)]
    narrowed = cfg.get("drafter") is not None or cfg.get("verifier") is not None
    for block in ([] if narrowed else (cfg.matrix.get("extra") or [])):
        extra_drafters = drafter_configs(cfg, list(block.drafters))
        for v in verifier_configs(cfg, list(block.verifiers)):
            found = next((ds for pv, ds in plan if cell_hash(pv) == cell_hash(v)), None)
            if found is None:
                plan.append((v, found := []))
            have = {cell_hash(d) for d in found}
            found.extend(d for d in extra_drafters if cell_hash(d) not in have)
    plan.sort(key=lambda vd: vd[0].name != REFERENCE)
    return [(v, sorted(ds, key=lambda d: d.name != "ar")) for v, ds in plan]


def cell_hash(obj) -> str:
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate(cfg) -> None:
    if int(cfg.max_new_tokens) < 1:
        raise QuasarError(f"max_new_tokens={cfg.max_new_tokens} is impossible: it must be >= 1")
    if float(cfg.temperature) < 0:
        raise QuasarError(f"temperature={cfg.temperature} is impossible: use 0 (greedy) or > 0")
    if not 0 < float(cfg.top_p) <= 1:
        raise QuasarError(f"top_p={cfg.top_p} must lie in (0, 1]")


# -- prompts --------------------------------------------------------------------------------------
def encode_turn(loaded: LoadedModel, turns: list[str], answers: list[str]) -> list[int]:
    """Token ids for the last of `turns`, after the earlier turns and the model's own answers."""
    tok = loaded.tokenizer
    if loaded.chat:
        messages = []
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"{q}\n{a}\n" for q, a in zip(turns, answers)) + turns[-1] + "\n"
    return tok(text)["input_ids"]


# -- the run --------------------------------------------------------------------------------------
def model_key(cfg) -> str:
    return cell_hash(cfg.model)


def get_model(cfg) -> LoadedModel:
    key = model_key(cfg)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time in memory
        log.info("loading model %s (%s)", cfg.model.name, key)
        _MODEL_CACHE[key] = load_model(cfg.model)
    else:
        log.info("reusing loaded model %s (%s)", cfg.model.name, key)
    return _MODEL_CACHE[key]


def build_runtime(loaded: LoadedModel, vcfg, cfg):
    if vcfg.name == REFERENCE:
        return loaded.runtime
    from .models import cache_dir
    from .verifiers import build_verifier

    return build_verifier(loaded, vcfg, cache_dir(cfg.model.get("cache_dir")))


class Experiment:
    def __init__(self, cfg):
        validate(cfg)
        self.cfg = cfg
        self.plan = plan_cells(cfg)
        self.verifiers = [v for v, _ in self.plan]
        unique = {cell_hash(d): d for _, ds in self.plan for d in ds}
        self.drafters = list(unique.values())  # every drafter config of the run, once
        ds = cfg.dataset
        self.prompts = data.load_prompts(ds.name, ds.get("path"), ds.get("categories"), ds.get("limit"))
        self.out_dir = Path(cfg.out_dir)
        self.store = ResultStore(self.out_dir)
        # Rows that must never be pooled: another experiment, token budget, seed or device kind.
        from .models import pick_device

        self.identity = {"experiment": cfg.experiment_name, "max_new_tokens": int(cfg.max_new_tokens),
                         "seed": int(cfg.seed), "device": pick_device(cfg.model.get("device")).type}
        self._check_identity()
        self.store_open = False
        self.references: dict = {}  # (prompt_id, turn) -> (prompt_ids, continuation)
        self.ref_logprobs: dict = {}

    def _check_identity(self):
        path = self.out_dir / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text()).get("identity")
            except ValueError:
                old = None
            if old != json.loads(json.dumps(self.identity)):
                raise QuasarError(f"{self.out_dir} holds rows from a different configuration ({old}); "
                                  "pick another out_dir= or delete that directory")
        elif self.out_dir.exists() and not os.access(self.out_dir, os.W_OK):
            raise QuasarError(f"cannot write results to {self.out_dir}; pick a writable out_dir=")

    def open_store(self):
        if not self.store_open:
            self.store.open({"identity": self.identity, "config": OmegaConf.to_container(self.cfg, resolve=True)})
            self.store_open = True

    def needs_reference(self) -> bool:
        fid = self.cfg.get("fidelity", "auto")
        has_other = any(v.name != REFERENCE for v in self.verifiers)
        synthetic = any(d.name == "synthetic" and d.get("replay", "own") == "reference" for d in self.drafters)
        return synthetic or fid is True or (fid == "auto" and has_other)

    def cell(self, loaded, vcfg, dcfg) -> tuple[str, dict]:
        rt = loaded.runtime
        config = {"model": OmegaConf.to_container(self.cfg.model, resolve=True),
                  "device": str(rt.device), "dtype": str(rt.dtype),
                  "verifier": OmegaConf.to_container(vcfg, resolve=True),
                  "drafter": OmegaConf.to_container(dcfg, resolve=True),
                  "dataset": OmegaConf.to_container(self.cfg.dataset, resolve=True),
                  "max_new_tokens": int(self.cfg.max_new_tokens), "temperature": float(self.cfg.temperature),
                  "top_p": float(self.cfg.top_p), "seed": int(self.cfg.seed)}
        return cell_hash(config), config

    def run(self) -> Path:
        cfg = self.cfg
        loaded = get_model(cfg)
        # Instantiate every drafter once before any row is written: bad drafter settings fail here.
        for d in self.drafters:
            make_drafter(d, loaded.runtime, loaded)
        self.env = environment()
        for vcfg, drafters in self.plan:
            runtime = build_runtime(loaded, vcfg, cfg)
            if self.needs_reference() and not self.references:
                self.compute_references(loaded)
            fidelity = self.fidelity(runtime) if self.ref_logprobs else {}
            self.maybe_cuda_graphs(runtime)
            self.own_ar = {}  # this verifier's own greedy AR output, for drafters that replay it
            for dcfg in drafters:
                self.run_cell(loaded, runtime, vcfg, dcfg, fidelity)
            if hasattr(runtime, "release"):  # the next verifier may copy the reference's modules
                runtime.release()
            del runtime
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return self.finish()

    def maybe_cuda_graphs(self, runtime):
        use = self.cfg.get("cuda_graphs", "auto")
        if runtime.device.type != "cuda" or use is False or not getattr(runtime, "is_native", False):
            if use is True and runtime.device.type != "cuda":
                raise QuasarError("cuda_graphs=true needs a CUDA device; use cuda_graphs=auto")
            return
        max_k = max([int(d.get("k", 0)) for d in self.drafters if d.name != "ar"] + [0])
        runtime.enable_cuda_graphs(max_tokens=max_k + 1, max_len=int(self.cfg.model.get("max_seq_len", 4096)))
        runtime.reset(runtime.graphs.max_len)  # allocate the cache the graphs will address
        runtime.graphs.capture_all()

    def replay_reference(self, runtime, loaded, dcfg, key, ids):
        """What a replaying drafter (synthetic) replays: by default this verifier's own greedy AR
        output, so its acceptance is the nominal alpha at any precision; `replay: reference`
        replays the reference verifier's continuation instead."""
        if dcfg.get("replay", "own") == "reference":
            ref = self.references.get(key)
            return ref[1] if ref else None
        key = (*key, tuple(ids))  # a later turn's prompt holds this cell's own earlier answers
        if key not in self.own_ar:
            ar = make_drafter(OmegaConf.create({"name": "ar"}), runtime, loaded)
            self.own_ar[key] = generate(runtime, ar, ids, int(self.cfg.max_new_tokens), 0, loaded.eos_ids).output_ids
        return self.own_ar[key]

    def compute_references(self, loaded):
        """The reference verifier's greedy AR continuation for every (prompt, turn), untimed."""
        rt = loaded.runtime
        ar = make_drafter(OmegaConf.create({"name": "ar"}), rt, loaded)
        for p in tqdm(self.prompts, desc="reference continuations", disable=not self.cfg.progress):
            answers = []
            for turn in range(len(p.turns)):
                ids = encode_turn(loaded, p.turns[: turn + 1], answers)
                res = generate(rt, ar, ids, int(self.cfg.max_new_tokens), 0, loaded.eos_ids)
                self.references[(p.prompt_id, turn + 1)] = (ids, res.output_ids)
                answers.append(decode_text(loaded.tokenizer, res.output_ids))
                if self.needs_fidelity():
                    self.ref_logprobs[(p.prompt_id, turn + 1)] = teacher_forced_logprobs(rt, ids, res.output_ids)

    def needs_fidelity(self) -> bool:
        fid = self.cfg.get("fidelity", "auto")
        return fid is True or (fid == "auto" and any(v.name != REFERENCE for v in self.verifiers))

    def fidelity(self, runtime) -> dict:
        out = {}
        for key, ref_lp in self.ref_logprobs.items():
            ids, cont = self.references[key]
            out[key] = logit_fidelity(ref_lp, teacher_forced_logprobs(runtime, ids, cont))
        return out

    def run_cell(self, loaded, runtime, vcfg, dcfg, fidelity):
        cfg = self.cfg
        cell_id, config = self.cell(loaded, vcfg, dcfg)
        done = self.store.done_keys(cell_id) if (self.out_dir / "manifest.json").exists() else set()
        todo = [p for p in self.prompts if any((p.prompt_id, t + 1) not in done for t in range(len(p.turns)))]
        label = f"{vcfg.get('label') or vcfg.name}/{dcfg.get('label') or dcfg.name}"
        if not todo:
            log.info("%s: all %d prompts already stored, skipping", label, len(self.prompts))
            return
        drafter = make_drafter(dcfg, runtime, loaded)
        k = 0 if dcfg.name == "ar" else int(dcfg.k)
        gen_kw = dict(max_new_tokens=int(cfg.max_new_tokens), k=k, eos_ids=loaded.eos_ids,
                      temperature=float(cfg.temperature), top_p=float(cfg.top_p))
        replays = dcfg.name == "synthetic" and dcfg.get("acceptance", "verify") != "forced"
        if cfg.get("warmup", True):  # compile/allocate once outside the timed region
            first = self.prompts[0]
            warm_ids = encode_turn(loaded, first.turns[:1], [])
            warm_ref = self.replay_reference(runtime, loaded, dcfg, (first.prompt_id, 1), warm_ids) if replays else None
            generate(runtime, drafter, warm_ids, **{**gen_kw, "max_new_tokens": min(8, gen_kw["max_new_tokens"])},
                     generator=torch.Generator().manual_seed(0), reference=warm_ref)
        self.open_store()
        self.store.record_cell(cell_id, config)
        for p in tqdm(todo, desc=label, disable=not cfg.progress):
            rows, answers = [], []
            for turn in range(1, len(p.turns) + 1):
                ids = encode_turn(loaded, p.turns[:turn], answers)
                seed = int(hashlib.sha256(f"{cfg.seed}/{p.prompt_id}/{turn}".encode()).hexdigest()[:8], 16)
                ref = self.references.get((p.prompt_id, turn))
                replay = self.replay_reference(runtime, loaded, dcfg, (p.prompt_id, turn), ids) if replays else None
                if runtime.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                res = generate(runtime, drafter, ids, **gen_kw, generator=torch.Generator().manual_seed(seed),
                               reference=replay)
                if dcfg.name == "ar" and float(cfg.temperature) == 0:
                    self.own_ar[(p.prompt_id, turn, tuple(ids))] = res.output_ids
                text = decode_text(loaded.tokenizer, res.output_ids)
                answers.append(text)
                if (p.prompt_id, turn) in done:
                    continue
                row = self.row(loaded, runtime, vcfg, dcfg, cell_id, p, turn, ids, res, text, seed)
                row.update(fidelity.get((p.prompt_id, turn), {}))
                if ref is not None and self.needs_fidelity():
                    row.update(match_metrics(res.output_ids, ref[1]))
                rows.append(row)
            self.store.append(rows)

    def row(self, loaded, runtime, vcfg, dcfg, cell_id, p, turn, prompt_ids, res, text, seed) -> dict:
        cfg, n = self.cfg, len(res.output_ids)
        if runtime.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:  # process peak RSS: the best CPU analogue (it never decreases within a run)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "experiment": cfg.experiment_name, "cell_id": cell_id, "model": loaded.name,
            "drafter": dcfg.get("label") or dcfg.name, "drafter_name": dcfg.name,
            "verifier": vcfg.get("label") or vcfg.name, "k": 0 if dcfg.name == "ar" else int(dcfg.k),
            "temperature": float(cfg.temperature), "top_p": float(cfg.top_p),
            "dataset": p.dataset, "category": p.category, "prompt_id": str(p.prompt_id), "turn": turn,
            "prompt_tokens": len(prompt_ids), "new_tokens": n, "verify_steps": res.verify_steps,
            "tau": tau(n, res.verify_steps), "alpha": alpha(res.accepted, res.drafted),
            "accepted_per_position": per_position_acceptance(res.attempts, res.accepts),
            "drafted": res.drafted, "accepted": res.accepted, "stopped_by": res.stopped_by,
            "prefill_s": res.prefill_s, "decode_s": res.decode_s, "draft_s": res.draft_s,
            "verify_s": res.verify_s, "other_s": res.decode_s - res.draft_s - res.verify_s,
            "tokens_per_s": n / res.decode_s if res.decode_s > 0 else math.nan,
            "peak_mem_bytes": int(peak), "weight_bytes": weight_bytes(runtime), "prompt_ids": list(prompt_ids), "output_ids": res.output_ids,
            "output_text": text, "seed": seed, "device": device_name(runtime.device),
            "dtype": str(runtime.dtype).removeprefix("torch."), "torch_version": torch.__version__,
            "git_commit": self.env.get("git_commit", git_commit()),
        }

    def finish(self) -> Path:
        from .summary import format_table, save, summarize

        if not self.store_open and not (self.out_dir / "manifest.json").exists():
            raise QuasarError("nothing was run: the matrix is empty")
        df = self.store.load()
        atomic_export(df, self.out_dir)
        summary = summarize(df)
        save(summary, self.out_dir / "summary.csv")
        if self.cfg.get("logger") is not None and self.cfg.logger.get("name") == "wandb":
            from .wandb_logger import log_results

            log_results(self.cfg, df, summary, self.out_dir)
        print(format_table(summary))
        print(f"\nresults: {self.out_dir.resolve()}  (rows.parquet, rows.csv, summary.csv)")
        return self.out_dir


def decode_text(tokenizer, ids: list[int]) -> str:
    """Text of generated ids. A random-weight model with a larger vocabulary than its stand-in
    tokenizer (Qwen3-8B shapes, SmolLM2 tokenizer) can emit ids the tokenizer lacks: shown as <id>."""
    n = len(tokenizer)
    if all(i < n for i in ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return "".join(tokenizer.decode([i], skip_special_tokens=True) if i < n else f"<{i}>" for i in ids)


def weight_bytes(runtime) -> int:
    """Bytes of weights one full forward reads: every parameter and buffer except the embedding
    table (a forward gathers only its rows; counted once when tied to lm_head), the RoPE tables
    and the KV cache. Divided by the verify time, it gives the bandwidth a step achieves."""
    module = getattr(runtime, "model", runtime)
    seen, total = set(), 0
    embed = getattr(module, "embed_tokens", None)
    skip = {id(embed.weight)} if embed is not None and getattr(module, "lm_head", None) is not None \
        and module.lm_head.weight is not embed.weight else set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen or id(t) in skip or "rope" in name:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def atomic_export(df, out_dir: Path) -> None:
    for name, write in (("rows.parquet", lambda p: df.to_parquet(p, index=False)),
                        ("rows.csv", lambda p: df.to_csv(p, index=False))):
        tmp = out_dir / f".tmp-{name}"
        write(tmp)
        os.replace(tmp, out_dir / name)
