"""CPU fp32 step time of the native SmolLM2 runtime at 1, 2 and 6 tokens, with products of 1-2 rows on
F.linear (pack_min_rows 3) and on the oneDNN-packed weights (pack_min_rows 1): the measurement behind
quasar_kernels.reference's per-host choice (QUASAR_CPU_PACK_MIN_ROWS).

    python experiments/cpu_small_rows.py [--threads 2] [--rounds 15] [--out results/cpu_small_rows.md]

One forward of T tokens after a 64-token prefill, rolled back; the settings and T interleaved per
round, the first round untimed; the median (min-max) over the rest.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quasar_bench.models import load_model  # noqa: E402
from quasar_kernels import reference as R  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rt = load_model(OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml")).runtime
    prompt = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8] * 8)
    rt.reset(256)
    rt.prefill(prompt)
    times = {}
    for r in range(args.rounds + 1):
        for min_rows in (3, 1):
            R.PACK_MIN_ROWS = min_rows
            for t in (1, 2, 6):
                x = torch.arange(10, 10 + t)
                t0 = time.perf_counter()
                rt.forward(x)
                dt = time.perf_counter() - t0
                rt.rollback(len(prompt))
                if r:
                    times.setdefault((min_rows, t), []).append(dt * 1e3)
    lines = [f"# CPU step time by where 1-2-row products run: SmolLM2-135M fp32, native runtime\n",
             f"`python experiments/cpu_small_rows.py --threads {args.threads} --rounds {args.rounds}` "
             f"({time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {args.threads} torch "
             f"threads, torch {torch.__version__}). Median (min-max) ms over {args.rounds} interleaved rounds.\n",
             "| T | F.linear below 3 rows (pack_min_rows 3) | packed (pack_min_rows 1) |", "|---|---|---|"]
    for t in (1, 2, 6):
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in (times[(3, t)], times[(1, t)])]
        lines.append(f"| {t} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
