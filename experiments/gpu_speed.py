"""End-to-end verify speed at Qwen3-8B shapes (random weights) on one GPU.

    python experiments/gpu_speed.py [--out results/gpu] [hydra overrides...]

Runs `experiment=gpu_speed` (verifiers bf16 / int8 / w8a8 / int4 / pruned 25 % x drafters ar and
synthetic alpha in {0.5, 0.7, 0.8, 0.9}, k = 5) through the normal harness (static KV cache, CUDA
graphs), measures the device-to-device copy bandwidth in the same process, and writes e2e.csv and
e2e.md: tokens/s, tau, step time split, speedups, and the share of copy bandwidth the verify pass
achieves (weight bytes per forward x verify steps / verify time); e2e_rows.csv holds every row.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.bench_kernels import copy_bandwidth, driver_version  # noqa: E402


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read plus written (the kernel benchmarks' probe)."""
    return copy_bandwidth(quick=False)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    ap.add_argument("--runs", default="/tmp/quasar_gpu_speed", help="result store of the run")
    args, overrides = ap.parse_known_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_speed: error: no CUDA device; this benchmark measures GPU speed")
    from hydra import compose, initialize_config_dir

    from quasar_bench.run import Experiment

    command = "python experiments/gpu_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=gpu_speed", "experiment_name=gpu_speed",
                                           f"out_dir={args.runs}", *overrides])
    t0 = time.time()
    Experiment(cfg).run()
    rows = pd.read_parquet(Path(args.runs) / "rows.parquet")
    table = e2e_table(rows, copy_gbps)
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "driver": driver_version(), "torch": torch.__version__,
            "triton": triton.__version__, "copy_gbps": round(copy_gbps, 1), "command": command,
            "wall_s": round(time.time() - t0, 1)}
    for k, v in meta.items():
        table[k] = v
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "e2e.csv", index=False)
    # every row too (one per prompt x turn x cell, step-time split and versions included), not only
    # the aggregates; token ids and text are dropped (random weights: they mean nothing)
    rows.drop(columns=[c for c in ("prompt_ids", "output_ids", "output_text") if c in rows]).assign(
        **{k: v for k, v in meta.items() if k not in rows}).to_csv(out / "e2e_rows.csv", index=False)
    cols = ["verifier", "drafter", "tokens_per_s", "tau", "alpha_measured", "draft_ms_per_step",
            "verify_ms_per_step", "other_ms_per_step", "speedup_vs_ref_ar", "speedup_vs_ref_same_drafter",
            "verify_gbps", "frac_copy_bw"]
    md = table[cols].to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else table[cols].to_string()
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (out / "e2e.md").write_text(f"# End-to-end verify speed, Qwen3-8B shapes, random weights\n\n{head}\n\n{md}\n")
    print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
