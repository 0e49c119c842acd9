"""End-to-end verify speed at Qwen3-8B shapes (random weights) on one GPU.

    python experiments/gpu_speed.py [--out results/gpu] [hydra overrides...]
    python experiments/gpu_speed.py --experiment gpu_replay --source results/default [...]
    python experiments/gpu_speed.py --experiment gpu_batch dataset.path=<Spec-Bench question.jsonl> [...]
    python experiments/gpu_speed.py --experiment gpu_batch_replay --source results/batch_replay_source \
        dataset.path=<Spec-Bench question.jsonl> [...]

Runs `experiment=gpu_speed` (verifiers bf16 / int8 / w8a8 / int4 / pruned 25 % x drafters ar and
synthetic alpha in {0.5, 0.7, 0.8, 0.9}, k = 5) through the normal harness (static KV cache, CUDA
graphs), measures the device-to-device copy bandwidth in the same process, and writes e2e.csv and
e2e.md: tokens/s, tau, step time split, speedups, and the share of copy bandwidth the verify pass
achieves (weight bytes per forward x verify steps / verify time); e2e_rows.csv holds every row.

`--experiment gpu_replay --source DIR` runs the replay cells instead (drafter=replay: each cell
replays the per-step acceptance its verifier and drafter reached in the source run on a real model)
and writes replay.csv / replay.md / replay_rows.csv: the same columns, plus the source run's tau,
KL, top-1 and exact match beside each GPU row.

`--experiment gpu_batch` runs every cell at batch sizes 1..32 and writes batch.csv / batch.md /
batch_rows.csv: batch throughput, mean GEMM rows M per verify forward, step time, padding, speedups
at the same batch size, and the shares of copy bandwidth and of peak bf16 tensor FLOPs reached.
`--experiment gpu_batch_replay --source DIR` is the same with real acceptance: every sequence replays
its own (verifier, drafter, prompt) trace from the source run (ragged across the batch), and the
table (batch_replay.*) carries the source's tau beside each row.

Batch tables carry `other_share` (decode time outside drafting and verification); cells above
quasar_bench.summary.STALL_SHARE are named in a warning: they measured a stall, not the method.

`--packed` (batch experiments) runs with `batch_packed=true`: each batched forward's linears run on
the real tokens only (rounded up to a multiple of batch_pack_bucket rows, 32 unless set), not on B x the
widest draft; the table is <name>_packed.*,
its `padding` the GEMM rows' padding and `attention_padding` the [B, T] grid's.

`--from-rows A.csv B.csv` rebuilds a table from the row files of several calls without a GPU: a cell
with fewer rows than the others (a stopped call's) is left out and named; `--drafters a,b` keeps
only those drafters' rows. A cell that an earlier file already holds is a further timing of it (its
repeats are numbered after the earlier file's): batch tables then give each cell's `n_repeats` and
per-repeat ranges (`_lo` / `_hi`, each repeat against the comparator's same repeat).

Batch tables end with the crossovers (`## Crossovers` in the .md): per verifier and drafter, the
first batch size where it loses against the bf16 reference with the same drafter, and where a
drafter loses against AR on its verifier. With repeats a batch size loses only where every repeat
does; where the repeats fall on both sides of 1 it is named a tie (quasar_bench.summary.verdict).

Rows files and tables hold the cells this run visited: a --runs store reused across code versions
keeps the earlier runs' cells under the same labels, and those are left out (and counted on stderr).
`--from-rows` refuses rows of different machines, two different cells on one line of the table, and
files that are missing, damaged or another experiment's, each in one line.

A run stopped early (Ctrl-C, or SIGTERM from `timeout`) still writes `<name>_rows_partial.csv`
under --out: every row of this run's cells the result store holds, with the hardware columns, in one file.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quasar_bench.gpu_rows import (MACHINE_COLUMNS, check_one_cell_per_row_of_table, complete_cells,  # noqa: E402
                                   join_row_files, read_rows_file)
from quasar_bench.summary import STALL_SHARE, loss_and_ties, other_share, ratio_ranges, stall_warning, verdict  # noqa: E402
from quasar_kernels.bench_kernels import copy_bandwidth, driver_version  # noqa: E402


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read plus written (the kernel benchmarks' probe)."""
    return copy_bandwidth(quick=False)


# H100 SXM dense bf16 tensor-core peak (TFLOP/s), the denominator of frac_peak_bf16_flops
PEAK_BF16_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H200": 989.4}


def batch_table(rows: pd.DataFrame, copy_gbps: float, gpu: str = "") -> pd.DataFrame:
    """Per (verifier, drafter, batch size): batch throughput, the verify forward's time, its GEMM
    rows M, the share of copy bandwidth and of peak bf16 tensor FLOPs it reaches, and speedups at
    the same batch size (vs the verifier's AR, vs the reference verifier's AR, vs the reference
    verifier with the same drafter)."""
    g = rows.groupby(["verifier", "drafter", "batch_size"], sort=False)
    batches = rows.groupby(["verifier", "drafter", "batch_size", "batch_id"], sort=False).first()
    b = batches.groupby(level=[0, 1, 2], sort=False)
    t = pd.DataFrame({
        "new_tokens": g.new_tokens.sum(), "batch_s": b.batch_decode_s.sum(), "steps": b.batch_steps.sum(),
        "gemm_rows": (batches.gemm_rows_per_step * batches.batch_steps).groupby(level=[0, 1, 2], sort=False).sum(),
        "padding": b.batch_padding.mean(),
        **({"attention_padding": b.attention_padding.mean()} if "attention_padding" in rows else {}),
        "verify_steps": g.verify_steps.sum(), "weight_bytes": g.weight_bytes.first(), "baseline": g.baseline.first(),
        "n_prompts": g.prompt_id.nunique(), "tau": g.new_tokens.sum() / g.verify_steps.sum(),
        **({"kernel": g.kernel.first().fillna("cublas")} if "kernel" in rows else {}),
    }).reset_index()
    # decode time outside drafting and verification (NaN for rows files without the timing split)
    cells = ["verifier", "drafter", "batch_size"]
    share = other_share(rows, cells)
    t["other_share"] = share.reindex(pd.MultiIndex.from_frame(t[cells])).to_numpy() if len(share) else float("nan")
    t["throughput"] = t.new_tokens / t.batch_s
    t["mean_m"] = t.gemm_rows / t.steps
    t["step_ms"] = 1e3 * t.batch_s / t.steps
    t["frac_copy_bw"] = t.weight_bytes / (t.step_ms * 1e-3) / 1e9 / copy_gbps
    ref = "reference"
    if not (t.verifier == ref).any():
        raise SystemExit("gpu_speed: error: the batch table needs the reference verifier's rows (speedups and "
                         "FLOPs are counted against it); add them with --from-rows")
    params = t.loc[t.verifier == ref, "weight_bytes"].iloc[0] / 2  # bf16: 2 bytes per weight
    peak = PEAK_BF16_TFLOPS.get(gpu, float("nan"))
    t["tflops"] = 2 * params * t.mean_m / (t.step_ms * 1e-3) / 1e12
    t["frac_peak_bf16_flops"] = t.tflops / peak
    key = ["verifier", "batch_size"]
    ar = t[t.baseline].set_index(key).throughput
    t["speedup_vs_ar"] = t.throughput / pd.Series(list(zip(t.verifier, t.batch_size))).map(ar).to_numpy()
    ref_ar = t[t.baseline & (t.verifier == ref)].set_index("batch_size").throughput
    t["speedup_vs_ref_ar"] = t.throughput / t.batch_size.map(ref_ar)
    same = t[t.verifier == ref].set_index(["drafter", "batch_size"]).throughput
    t["speedup_vs_ref_same_drafter"] = t.throughput / pd.Series(list(zip(t.drafter, t.batch_size))).map(same).to_numpy()
    add_repeat_spread(t, rows, ref)
    order = {c: {v: i for i, v in enumerate(dict.fromkeys(rows[c]))} for c in ("verifier", "drafter")}
    return t.sort_values(["verifier", "drafter", "batch_size"],
                         key=lambda col: col.map(order[col.name]) if col.name in order else col).reset_index(drop=True)


def batch_crossovers(t: pd.DataFrame, margin: float = 0.0) -> list[str]:
    """One line per (verifier, drafter) of a batch table: where it stops paying against the bf16
    reference with the same drafter (non-reference verifiers) and against AR on its own verifier
    (drafters), by `verdict` over each batch size's per-repeat range (its pooled ratio when timed
    once) with the tie margin `margin` (--tie-margin); ties named."""
    lines = []
    for (v, d), g in t.groupby(["verifier", "drafter"], sort=False):
        g = g.sort_values("batch_size")
        tests = ([("speedup_vs_ref_same_drafter", f"{v} vs bf16 with {d}")] if v != "reference" else [])
        tests += [("speedup_vs_ar", f"{d} vs AR on {v}")] if not g.baseline.iloc[0] else []
        for m, what in tests:
            ratios = ratio_ranges(g[m], g[m + "_lo"], g[m + "_hi"])
            sizes = list(g.batch_size)
            if not any(verdict(r, margin) for r in ratios):
                continue
            lost, ties = loss_and_ties(sizes, ratios, margin)
            text = f"loses from B={lost}" if lost is not None else f"never loses (up to B={sizes[-1]})"
            text += f"; ties at B={', '.join(map(str, ties))}" if ties else ""
            lines.append(f"- {what}: {text}")
    return lines


def add_repeat_spread(t: pd.DataFrame, rows: pd.DataFrame, ref: str) -> None:
    """Per cell of the batch table `t`: `n_repeats` (timings of it), `throughput_lo` / `_hi` (its
    smallest and largest per-repeat throughput) and, for each speedup, `_lo` / `_hi`: the smallest
    and largest per-repeat ratio, each repeat against the comparator's same repeat (the harness
    times every cell once per repeat, all of repeat r before any of r + 1). NaN where fewer than two
    repeats are shared: one timing has no spread to show."""
    cells = ["verifier", "drafter", "batch_size"]
    r = rows.assign(repeat=rows["repeat"].fillna(0).astype(int) if "repeat" in rows else 0)
    tokens = r.groupby(cells + ["repeat"]).new_tokens.sum()
    walls = r.groupby(cells + ["repeat", "batch_id"]).batch_decode_s.first().groupby(level=[0, 1, 2, 3]).sum()
    per: dict[tuple, dict[int, float]] = {}
    for (v, d, b, rep), x in (tokens / walls).items():
        per.setdefault((v, d, b), {})[rep] = x
    ar = {(v, b): d for v, d, b, base in zip(t.verifier, t.drafter, t.batch_size, t.baseline) if base}  # AR's label
    ref_ar = {b: d for (v, b), d in ar.items() if v == ref}
    comparators = {"speedup_vs_ar": lambda v, d, b: (v, ar.get((v, b)), b),
                   "speedup_vs_ref_ar": lambda v, d, b: (ref, ref_ar.get(b), b),
                   "speedup_vs_ref_same_drafter": lambda v, d, b: (ref, d, b)}
    t["n_repeats"] = [len(per.get(c, {})) for c in zip(t.verifier, t.drafter, t.batch_size)]
    spread = {c: [] for c in ("throughput_lo", "throughput_hi", *(f"{m}_{e}" for m in comparators for e in ("lo", "hi")))}
    for c in zip(t.verifier, t.drafter, t.batch_size):
        run = per.get(c, {})
        vals = list(run.values())
        spread["throughput_lo"].append(min(vals) if len(vals) > 1 else float("nan"))
        spread["throughput_hi"].append(max(vals) if len(vals) > 1 else float("nan"))
        for m, comparator in comparators.items():
            base = per.get(comparator(*c), {})
            common = sorted(set(run) & set(base))
            ratios = [run[k] / base[k] for k in common] if len(common) > 1 else [float("nan")]
            spread[f"{m}_lo"].append(min(ratios))
            spread[f"{m}_hi"].append(max(ratios))
    for col, vals in spread.items():
        t[col] = vals


def flag_stalls(table: pd.DataFrame, limit: float = STALL_SHARE) -> list:
    """Cells that spent more than `limit` of their decode time outside drafting and verification
    (`other_share`): printed as a warning, since their throughput measures a stall, not the
    method; the cells are returned."""
    shares = table.set_index(["verifier", "drafter", "batch_size"])["other_share"]
    if line := stall_warning(shares, limit):
        print(line)
    return list(shares[shares > limit].index)


def e2e_table(rows: pd.DataFrame, copy_gbps: float) -> pd.DataFrame:
    g = rows.groupby(["verifier", "drafter"], sort=False)
    t = pd.DataFrame({
        "new_tokens": g.new_tokens.sum(), "verify_steps": g.verify_steps.sum(),
        "decode_s": g.decode_s.sum(), "draft_s": g.draft_s.sum(), "verify_s": g.verify_s.sum(),
        "drafted": g.drafted.sum(), "accepted": g.accepted.sum(), "weight_bytes": g.weight_bytes.first(),
        "n_prompts": g.prompt_id.nunique(), "baseline": g.baseline.first(),
    }).reset_index()
    t["tokens_per_s"] = t.new_tokens / t.decode_s
    t["tau"] = t.new_tokens / t.verify_steps
    t["alpha_measured"] = t.accepted / t.drafted.where(t.drafted > 0)
    t["draft_ms_per_step"] = 1e3 * t.draft_s / t.verify_steps
    t["verify_ms_per_step"] = 1e3 * t.verify_s / t.verify_steps
    t["other_ms_per_step"] = 1e3 * (t.decode_s - t.draft_s - t.verify_s) / t.verify_steps
    t["verify_gbps"] = t.weight_bytes * t.verify_steps / t.verify_s / 1e9
    t["frac_copy_bw"] = t.verify_gbps / copy_gbps
    ref = "reference"  # the loaded bf16 model
    ref_ar = t[(t.verifier == ref) & t.baseline].tokens_per_s.iloc[0]
    t["speedup_vs_ref_ar"] = t.tokens_per_s / ref_ar
    same = t[t.verifier == ref].set_index("drafter").tokens_per_s
    t["speedup_vs_ref_same_drafter"] = t.tokens_per_s / t.drafter.map(same)
    return t


def join_source(table: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """The source run's acceptance and fidelity per (verifier, drafter) label beside the GPU table."""
    g = source.groupby(["verifier", "drafter"])
    src = pd.DataFrame({"tau_source": g.new_tokens.sum() / g.verify_steps.sum(),
                        "n_rows_source": g.size()}).reset_index()
    for col in ("kl_mean", "top1_agree", "ref_exact_match"):
        if col in source:
            src = src.merge(g[col].mean().rename(f"{col}_source").reset_index(), on=["verifier", "drafter"])
    out = table.merge(src, on=["verifier", "drafter"], how="left")
    off = (out.tau - out.tau_source).abs() > 1e-9
    if off.any():  # replay must reproduce tau exactly; say so loudly if it did not
        print("warning: tau differs from the source for", out.loc[off, ["verifier", "drafter"]].values.tolist())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    ap.add_argument("--runs", default="/tmp/quasar_gpu_speed", help="result store of the run")
    ap.add_argument("--experiment", default="gpu_speed",
                    help="gpu_speed, gpu_batch, or gpu_replay / gpu_batch_replay (with --source)")
    ap.add_argument("--source", default=None,
                    help="gpu_replay / gpu_batch_replay: the real-model run whose traces are replayed")
    ap.add_argument("--from-rows", nargs="+", default=None, metavar="ROWS_CSV",
                    help="no run: rebuild the table from *_rows.csv files this script wrote (several GPU "
                         "calls' rows joined; needs no GPU). The hardware columns come from the rows.")
    ap.add_argument("--packed", action="store_true",
                    help="batch experiments: batch_packed=true (linears on real tokens only); writes <name>_packed.*")
    ap.add_argument("--tie-margin", type=float, default=0.0, metavar="M",
                    help="batch tables: a throughput ratio within M of 1 is a tie in the crossovers (0.02 = ±2 %%); "
                         "0 (default): only repeats on both sides of 1 tie. Recorded in the table as tie_margin")
    ap.add_argument("--drafters", default=None, metavar="A,B",
                    help="with --from-rows: tabulate only these drafters' rows (by label)")
    args, overrides = ap.parse_known_args(argv)
    if not 0.0 <= args.tie_margin < 0.5:
        ap.error(f"--tie-margin must be in [0, 0.5), got {args.tie_margin}")
    if args.tie_margin and not args.experiment.startswith("gpu_batch"):
        ap.error("--tie-margin judges batch crossovers: use it with a gpu_batch* experiment")
    if args.drafters and not args.from_rows:
        ap.error("--drafters filters rows joined with --from-rows; to run fewer drafters, override matrix.drafters=[...]")
    command = "python experiments/gpu_speed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    batched = args.experiment.startswith("gpu_batch")
    if args.experiment.endswith("replay") and not (args.source or args.from_rows):
        ap.error(f"--experiment {args.experiment} replays a real-model run: give its result directory with --source")
    if args.packed and not batched:
        ap.error("--packed packs batched forwards: use it with a gpu_batch* experiment")
    if any(o.lstrip("+").startswith("batch_packed=") for o in overrides):
        ap.error("give --packed instead of batch_packed=...: the table's name says which it is")
    if args.packed and not args.from_rows:
        overrides = [*overrides, "batch_packed=true"]
    name = "e2e" if args.experiment == "gpu_speed" else args.experiment.removeprefix("gpu_")
    name += "_packed" if args.packed else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_rows:
        try:
            rows, meta = rows_from_files(args, batched, command)
        except ValueError as e:
            ap.error(str(e))
        copy_gbps = float(meta["copy_gbps"])
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_speed: error: no CUDA device; this benchmark measures GPU speed")
        signal.signal(signal.SIGTERM, _stop)  # `timeout`'s SIGTERM: unwind, keeping the rows so far
        meta = hardware_meta(command)
        try:
            rows, copy_gbps = run_cells(args, overrides, meta)
        except (KeyboardInterrupt, SystemExit):
            saved = save_partial_rows(Path(args.runs), out, name, meta)
            print(f"gpu_speed: stopped early; {saved or 'no rows yet'}", file=sys.stderr, flush=True)
            raise
        # every row first (one per prompt x turn x cell, step-time split and versions included), so
        # a failure in the table below loses nothing
        rows = export_rows(rows, meta)
        rows.to_csv(out / f"{name}_rows.csv", index=False)
    try:
        check_one_cell_per_row_of_table(rows, ["verifier", "drafter", "batch_size"] if batched else ["verifier", "drafter"])
    except ValueError as e:
        ap.error(str(e))
    table = batch_table(rows, copy_gbps, str(meta.get("gpu", ""))) if batched else e2e_table(rows, copy_gbps)
    if batched:
        flag_stalls(table)
        if args.tie_margin:  # what the crossovers and the figure's ties were judged with
            table["tie_margin"] = args.tie_margin
    table["max_new_tokens"] = int(rows["max_new_tokens"].max()) if "max_new_tokens" in rows else None
    title = "End-to-end verify speed, Qwen3-8B shapes, random weights"
    if batched:
        replayed = "drafter_name" in rows and (rows["drafter_name"] == "replay").any()
        title = ("Batched verification at Qwen3-8B shapes, random weights ("
                 + ("replayed acceptance; pass --source to join the source's tau" if replayed else "synthetic forced acceptance")
                 + ")")
    if args.source:
        from quasar_bench.drafters.replay import read_rows

        table = join_source(table, read_rows(args.source))
        title = f"Real acceptance (replayed from {args.source}) at Qwen3-8B speed, random weights"
        if batched:
            title = (f"Batched verification with real acceptance (each sequence replays its own trace from "
                     f"{args.source}) at Qwen3-8B shapes, random weights")
    for k, v in meta.items():
        table[k] = v
    table.to_csv(out / f"{name}.csv", index=False)
    cols = ["verifier", "drafter", "tokens_per_s", "tau", "alpha_measured", "draft_ms_per_step",
            "verify_ms_per_step", "other_ms_per_step", "speedup_vs_ref_ar", "speedup_vs_ref_same_drafter",
            "verify_gbps", "frac_copy_bw"]
    cols += [c for c in table if c.endswith("_source") and c != "n_rows_source"]
    if batched:
        cols = ["verifier", "drafter", "batch_size", "throughput", "tau", "mean_m", "step_ms", "padding",
                "other_share", "speedup_vs_ar", "speedup_vs_ref_ar", "speedup_vs_ref_same_drafter",
                "frac_copy_bw", "frac_peak_bf16_flops"]
        if "kernel" in table:
            cols.insert(2, "kernel")
        if args.packed:
            cols.insert(cols.index("padding") + 1, "attention_padding")
        if "tau_source" in table:
            cols.insert(cols.index("tau") + 1, "tau_source")
    shown = table[cols].copy()
    if batched and (table["n_repeats"] > 1).any():  # timed more than once: each speedup's per-repeat range
        cols.insert(cols.index("batch_size") + 1, "n_repeats")
        shown = table[cols].copy()
        for m in ("speedup_vs_ar", "speedup_vs_ref_ar", "speedup_vs_ref_same_drafter"):
            shown[m] = [f"{x:.3g}" + (f" ({lo:.3g}-{hi:.3g})" if lo == lo else "")
                        for x, lo, hi in zip(table[m], table[m + "_lo"], table[m + "_hi"])]
    md = shown.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else shown.to_string()
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    cross = ""
    if batched:
        once = table["n_repeats"] < 2
        m = args.tie_margin
        how = ("A batch size loses where every repeat loses (each against the comparator's same repeat); a tie "
               "where the repeats fall on both sides of 1." if not once.all() else "")
        if m:
            how = (f"Tie margin {m:g} (--tie-margin): a batch size loses where every ratio (per repeat, each against "
                   f"the comparator's same repeat) is below {1 - m:g}, pays where every one is at least {1 + m:g}, "
                   "and ties otherwise.")
        if once.any():
            how += (" " if how else "") + (("Cells with n_repeats 1 were" if not once.all() else "Every cell was")
                                           + (" timed once: their ratios are called a win or a loss by their sign alone, "
                                              "even a few % from 1 (within timing noise)." if not m else
                                              " timed once: outside the margin their ratios are called a win or a loss by "
                                              "their sign alone."))
        cross = "\n## Crossovers\n\n" + how + "\n\n" + "\n".join(batch_crossovers(table, m)) + "\n"
    (out / f"{name}.md").write_text(f"# {title}\n\n{head}\n\n{md}\n{cross}")
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


def rows_from_files(args, batched: bool, command: str) -> tuple[pd.DataFrame, dict]:
    """--from-rows: the rows of the files joined (quasar_bench.gpu_rows), filtered to --drafters, and
    the table's header (hardware from the rows, this command and the calls' commands); every refusal
    a ValueError naming the fix."""
    frames = [read_rows_file(f, batched) for f in args.from_rows]
    rows = complete_cells(join_row_files(frames, args.from_rows))
    if args.drafters:
        keep = args.drafters.split(",")
        if missing := set(keep) - set(rows["drafter"]):
            raise ValueError(f"--drafters: no rows for {sorted(missing)}; the rows hold {sorted(set(rows['drafter']))}")
        rows = rows[rows["drafter"].isin(keep)]
    batches = rows[rows["batch_size"] > 1] if "batch_size" in rows else rows.iloc[:0]
    packed = set(batches["batch_packed"].fillna(False).astype(bool)) if "batch_packed" in batches else {False}
    if batched and len(batches) and packed != {args.packed}:
        raise ValueError(f"the rows' batches are {'packed' if True in packed else 'unpacked'}"
                         f"{' and unpacked' if len(packed) > 1 else ''}: one table holds one kind; "
                         f"{'add' if True in packed else 'drop'} --packed, or pass only one kind's rows")
    meta = {k: rows[k].iloc[0] for k in MACHINE_COLUMNS if k in rows}
    if "copy_gbps" in rows:  # measured once per call: calls on one machine kind differ by a few GB/s
        meta["copy_gbps"] = float(rows["copy_gbps"].median())
    meta["command"] = command
    meta["source_commands"] = " ; ".join(dict.fromkeys(rows["command"].dropna())) if "command" in rows else ""
    return rows, meta


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def hardware_meta(command: str) -> dict:
    """GPU, driver, versions, copy bandwidth and the command: the columns every row file carries."""
    import triton

    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    return {"gpu": torch.cuda.get_device_name(), "driver": driver_version(), "torch": torch.__version__,
            "triton": triton.__version__, "copy_gbps": round(copy_gbps, 1), "command": command}


def save_partial_rows(runs: Path, out: Path, name: str, meta: dict) -> Path | None:
    """The rows a stopped run's store holds, as one CSV beside the tables (token ids and text
    dropped, hardware columns added); None when it holds none."""
    from quasar_bench.store import ResultStore

    try:
        rows = ResultStore(runs).load() if runs.exists() else pd.DataFrame()
    except Exception as e:  # noqa: BLE001 - a damaged store: say so, lose nothing else
        print(f"gpu_speed: the store {runs} could not be read ({e})", file=sys.stderr)
        return None
    rows = this_runs_rows(rows)
    if rows.empty:
        return None
    path = out / f"{name}_rows_partial.csv"
    export_rows(rows, meta).to_csv(path, index=False)
    return path


def export_rows(rows: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Rows as the CSVs keep them: token ids and text dropped (random weights: they mean nothing),
    the hardware columns added."""
    rows = rows.drop(columns=[c for c in ("prompt_ids", "output_ids", "output_text") if c in rows])
    return rows.assign(**{k: v for k, v in meta.items() if k not in rows})


def run_cells(args, overrides, meta):
    """Run the experiment's cells through the normal harness; returns (rows, copy GB/s) and adds the
    run's wall time to `meta`."""
    from hydra import compose, initialize_config_dir

    from quasar_bench.run import Experiment

    copy_gbps = float(meta["copy_gbps"])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        extra = [f"traces={Path(args.source).resolve()}"] if args.source else []
        cfg = compose("config", overrides=[f"experiment={args.experiment}", f"experiment_name={args.experiment}",
                                           f"out_dir={args.runs}", *extra, *overrides])
    t0 = time.time()
    global _EXPERIMENT
    _EXPERIMENT = Experiment(cfg)
    _EXPERIMENT.run()
    rows = this_runs_rows(pd.read_parquet(Path(args.runs) / "rows.parquet")).assign(max_new_tokens=int(cfg.max_new_tokens))
    meta["wall_s"] = round(time.time() - t0, 1)
    return rows, copy_gbps


_EXPERIMENT = None  # the run in progress, so a stopped run's rows can be limited to its own cells


def this_runs_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the cells this run visited. A --runs store reused across code versions also holds
    the earlier runs' cells under the same labels; tabulating them with this run's would pool two
    cells on one line (refused) and the rows file would carry them on. Each dropped cell count is
    said on stderr."""
    visited = getattr(_EXPERIMENT, "cell_ids", None)  # None: no run in this process (rows given as they are)
    if visited is None or "cell_id" not in rows:
        return rows
    keep = rows["cell_id"].isin(visited)
    if (~keep).any():
        print(f"gpu_speed: {rows.loc[~keep, 'cell_id'].nunique()} cell(s) of earlier runs in the store left out "
              f"(not this run's configuration or code version)", file=sys.stderr)
    return rows[keep]


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
