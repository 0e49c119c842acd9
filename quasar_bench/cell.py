"""One visit of a cell: (verifier, drafter, batch size) over the prompts, each timed once as
repeat r, rows to the store.

Per prompt, the turns run in order (a later turn's prompt holds the cell's own earlier answers);
stored (prompt, turn, repeat) rows are skipped on resume but their answers are regenerated so
later turns see the same text. One untimed warm-up generation comes first in every visit (the
visit before it may have been another verifier's). At temperature 0 every repeat must generate
the tokens of the cell's other repeats (stored or generated in this process): repeated timings
time the same work, and a nondeterministic kernel is reported instead of averaged over.

Teacher-forced acceptance (τ_tf): for a drafting cell of a non-reference verifier, each (prompt,
turn) is decoded a second time, untimed, by the same loop, drafter and verifier held to the
reference verifier's continuation of that (prompt, turn) (decode.py, `teachers`): the acceptance
the verifier reaches on the reference's text rather than on its own. It does not depend on the
timing, so it runs in repeat 0 only and sits in repeat 0's rows.
"""
from __future__ import annotations

import hashlib
import logging
import time

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .backends import describe
from .decode import generate_batch
from .drafters import make_drafter
from .encode import decode_text, encode_turn
from .errors import QuasarError
from .fidelity import match_metrics
from .metrics import tau
from .rows import Cell, device_name, make_row, peak_memory, resident_weight_bytes, weight_bytes

log = logging.getLogger(__name__)


def describe_cell(run, runtime, vcfg, dcfg, drafter, is_reference: bool, batch_size: int = 1) -> Cell:
    """The cell's identity (its full resolved configuration) and the fields its rows share."""
    cfg = run.cfg
    config = {"model": OmegaConf.to_container(cfg.model, resolve=True), "model_label": run.loaded.name,
              "weights": run.identity_parts["weights"],
              "code": run.identity_parts["code"], "prompts": run.identity_parts["prompts"],
              "device": str(runtime.device), "engine": run.engine,
              "dtype": str(runtime.dtype), "verifier": OmegaConf.to_container(vcfg, resolve=True),
              "drafter": OmegaConf.to_container(dcfg, resolve=True),
              "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
              "max_new_tokens": int(cfg.max_new_tokens), "temperature": float(cfg.temperature),
              "top_p": float(cfg.top_p), "seed": int(cfg.seed)}
    if batch_size > 1:  # absent at 1: cells stored before the batch axis keep their identity
        config["batch_size"] = batch_size
    packed = batch_size > 1 and bool(cfg.get("batch_packed", False))  # one row has no padding to skip
    if packed:  # absent when off: cells stored before packing keep their identity
        config["batch_packed"] = True
        config["batch_pack_bucket"] = int(cfg.get("batch_pack_bucket", 32))
    from .plan import cell_hash

    # the comparable cells: all but drafter, verifier and batch size (speedups match the batch size)
    context = cell_hash({k: v for k, v in config.items() if k not in ("drafter", "verifier", "batch_size")})
    return Cell(cell_id=cell_hash(config), context_id=context, config=config, experiment=cfg.experiment_name,
                model=run.loaded.name, model_weights=run.identity_parts["weights"],
                verifier=vcfg.get("label") or vcfg.name, drafter=dcfg.get("label") or dcfg.name, batch_size=batch_size,
                batch_packed=packed,
                drafter_name=dcfg.name, is_reference=is_reference, baseline=not drafter.drafts,
                forced_acceptance=drafter.forces_acceptance, k=drafter.k,
                kernel=",".join(sorted({describe(m.kernel, runtime.device.type, m.op) for m in runtime.modules()
                                        if hasattr(m, "backend")})) if getattr(runtime, "kernel_ops", None) else "",
                temperature=float(cfg.temperature), top_p=float(cfg.top_p), device=device_name(runtime.device),
                dtype=str(runtime.dtype).removeprefix("torch."), weight_bytes=weight_bytes(runtime),
                git_commit=run.env.get("git_commit", "unknown"), drafter_fields=drafter.row_fields(),
                runtime="native" if getattr(runtime, "is_native", False) else "generic")


def prompt_seed(seed: int, prompt_id, turn: int) -> int:
    return int(hashlib.sha256(f"{seed}/{prompt_id}/{turn}".encode()).hexdigest()[:8], 16)


def run_cell(run, live, dcfg, batch_size: int, repeat: int) -> None:
    """Visit `repeat` of the cell (live verifier, drafter config, batch size): time every prompt
    whose (prompt, turn, repeat) rows are not stored yet, and append their rows."""
    from .plan import cell_hash

    cfg, loaded, refs, runtime = run.cfg, run.loaded, run.references, live.runtime
    dkey = cell_hash(dcfg)
    if dkey not in live.drafters:  # made once per verifier: a model-based drafter's build is not repeated
        live.drafters[dkey] = make_drafter(dcfg, runtime, loaded, run.tools)
    drafter = live.drafters[dkey]
    if (dkey, batch_size) not in live.cells:
        live.cells[(dkey, batch_size)] = describe_cell(run, runtime, live.vcfg, dcfg, drafter, live.is_reference,
                                                       batch_size)
    cell = live.cells[(dkey, batch_size)]
    run.cell_ids.add(cell.cell_id)
    label = f"{cell.verifier}/{cell.drafter}" + (f"/B={batch_size}" if batch_size > 1 else "") + f" repeat {repeat}"

    def missing(done):
        return [p for p in run.prompts if any((p.prompt_id, t + 1, repeat) not in done for t in range(len(p.turns)))]
    stored = (run.out_dir / "manifest.json").exists()
    todo = missing(run.store.done_keys(cell.cell_id) if stored else set())
    if not todo:
        log.info("%s: all %d prompts already stored, skipping", label, len(run.prompts))
        if not run.store.has_cell(cell.cell_id):  # its config file was lost or damaged: this run knows it
            run.store.record_cell(cell.cell_id, cell.config)
        return
    gen_kw = dict(max_new_tokens=int(cfg.max_new_tokens), k=drafter.k, eos_ids=loaded.eos_ids,
                  temperature=float(cfg.temperature), top_p=float(cfg.top_p))
    batch = live.batch_runtime(batch_size)
    drafters = [drafter] if batch_size == 1 else [drafter.for_sequence(batch.seq(b)) for b in range(batch_size)]
    forced = (getattr(run, "teacher_forced", False) and repeat == 0
              and not (live.is_reference or cell.baseline or drafter.forces_acceptance))
    if cfg.warmup:  # compile/allocate once outside the timed region: the first batch's first turns
        first = run.prompts[:batch_size]
        jobs = [(p, 1, encode_turn(loaded, p.turns[:1], [])) for p in first]
        generate_jobs(run, live, batch, drafters, cell, jobs, {**gen_kw, "max_new_tokens": min(8, gen_kw["max_new_tokens"])})
    run.open_store()
    run.store.record_cell(cell.cell_id, cell.config)  # takes the cell's lock: re-read what is done under it
    done = run.store.done_keys(cell.cell_id)
    todo = missing(done)
    if cell.cell_id not in run.outputs:  # what earlier sessions' repeats generated
        run.outputs[cell.cell_id] = run.store.outputs(cell.cell_id)
    seen = run.outputs[cell.cell_id]
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for chunk in tqdm(chunks, desc=label, disable=not cfg.progress):
        # A later turn's prompt holds the cell's own earlier answers: turns run in order, the
        # chunk's prompts side by side (those with fewer turns leave the batch: padding).
        rows, answers = [], {p.prompt_id: [] for p in chunk}
        for turn in range(1, max(len(p.turns) for p in chunk) + 1):
            members = [p for p in chunk if len(p.turns) >= turn]
            jobs = [(p, turn, encode_turn(loaded, p.turns[:turn], answers[p.prompt_id])) for p in members]
            if runtime.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timed_at = time.time()
            results = generate_jobs(run, live, batch, drafters, cell, jobs, gen_kw)
            resident = resident_weight_bytes(runtime)
            tf = teacher_forced(run, live, batch, drafters, cell, members, turn, gen_kw) if forced else {}
            for (p, _, ids), res in zip(jobs, results):
                key = (p.prompt_id, turn)
                if float(cfg.temperature) == 0:
                    check_repeat(seen.setdefault(key, res.output_ids), res.output_ids, label, key)
                if cell.baseline and float(cfg.temperature) == 0:
                    refs.remember_own(live.key, key, ids, res.output_ids)
                text = decode_text(loaded.tokenizer, res.output_ids)
                answers[p.prompt_id].append(text)
                if (*key, repeat) in done:
                    continue
                row = make_row(cell, p, turn, ids, res, text, prompt_seed(int(cfg.seed), p.prompt_id, turn),
                               peak_memory(runtime.device), repeat, timed_at)
                row["resident_weight_bytes"] = resident  # after the forwards: lazily made layouts exist
                row["batch_id"] = f"{jobs[0][0].prompt_id}/{turn}/{repeat}"  # the rows that shared its forwards
                row.update(live.fidelity.get(key, {}))
                row.update(tf.get(key, {}))
                if key in refs.continuations and refs.logprobs:
                    row.update(match_metrics(res.output_ids, refs.continuations[key][1]))
                rows.append(row)
        run.store.append(rows)


def check_repeat(first: list[int], now: list[int], label: str, key) -> None:
    """Greedy decoding is deterministic: a repeat generating other tokens than the cell's earlier
    repeats would time other work (a nondeterministic kernel, or a change between sessions)."""
    if list(first) == list(now):
        return
    at = next((i for i, (a, b) in enumerate(zip(first, now)) if a != b), min(len(first), len(now)))
    raise QuasarError(f"{label}: prompt {key[0]} turn {key[1]} generated other tokens than the cell's earlier repeat "
                      f"(first difference at new token {at}): greedy decoding is not deterministic here, so "
                      "repeated timings would time different work; find the nondeterministic kernel, or time "
                      "once with repeats=1 into a new out_dir=")


def generate_jobs(run, live, batch, drafters, cell, jobs, gen_kw, teachers=None):
    """Generate (prompt, turn, ids) jobs together (one per sequence of the batch), each with its
    own seeded generator (the same in every repeat) and its own replayed continuation; with
    `teachers`, each held to its teacher continuation, which is then also what a replaying
    drafter replays."""
    seeds = [prompt_seed(int(run.cfg.seed), p.prompt_id, turn) for p, turn, _ in jobs]
    if teachers is None:
        replays = [run.references.replay(drafters[i], live.runtime, live.key, (p.prompt_id, turn), ids)
                   for i, (p, turn, ids) in enumerate(jobs)]
    else:
        replays = [t if drafters[i].replays else None for i, t in enumerate(teachers)]
    for d, (p, turn, _) in zip(drafters, jobs):
        d.begin(cell.verifier, str(p.prompt_id), turn)
    return generate_batch(batch, drafters[:len(jobs)], [ids for _, _, ids in jobs], **gen_kw,
                          generators=[torch.Generator().manual_seed(s) for s in seeds], references=replays,
                          teachers=teachers)


def teacher_forced(run, live, batch, drafters, cell, prompts, turn: int, gen_kw) -> dict:
    """(prompt_id, turn) -> τ_tf columns: each prompt's reference prompt ids and reference
    continuation (the reference verifier's, so a later turn holds the reference's earlier answers,
    not this cell's), decoded by the cell's drafter and verifier held to that continuation."""
    refs = run.references.continuations
    jobs = [(p, turn, refs[(p.prompt_id, turn)][0]) for p in prompts if (p.prompt_id, turn) in refs]
    teachers = [refs[(p.prompt_id, turn)][1] for p, _, _ in jobs]
    jobs, teachers = [j for j, t in zip(jobs, teachers) if t], [t for t in teachers if t]
    if not jobs:
        return {}
    results = generate_jobs(run, live, batch, drafters, cell, jobs, gen_kw, teachers=teachers)
    return {(p.prompt_id, turn): {"tau_tf": tau(len(r.output_ids), r.verify_steps), "tf_new_tokens": len(r.output_ids),
                                  "tf_verify_steps": r.verify_steps, "tf_accepted": r.accepted, "tf_drafted": r.drafted}
            for (p, turn, _), r in zip(jobs, results)}


def capture_graphs(runtime, cfg, widths: list[int]) -> None:
    """CUDA graphs for the forwards of `widths` tokens (AR and verify steps: 1 .. k + 1; a drafter's
    own wider forward on the verifier), captured (and kernels autotuned) before any timing, when
    the device and runtime allow."""
    use = cfg.cuda_graphs
    if runtime.device.type != "cuda" or use is False or not getattr(runtime, "is_native", False):
        if use is True and runtime.device.type != "cuda":
            from .errors import QuasarError

            raise QuasarError("cuda_graphs=true needs a CUDA device; use cuda_graphs=auto")
        return
    runtime.enable_cuda_graphs(max_tokens=max(widths), max_len=int(cfg.model.max_seq_len))
    runtime.reset(runtime.graphs.max_len)  # allocate the cache the graphs will address
    runtime.graphs.capture_all(widths)
