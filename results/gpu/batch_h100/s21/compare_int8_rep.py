"""The int8 / w8a8 grid timed a second time (session 23, another H100 machine, newer code) against its first
timing (session 21, `int8_w8a8/`): per cell, throughput of the second over the first.

The two calls ran different code versions (harness changes between them: other cell contexts), so the
second timing is not joined into `batch.csv` as a repeat (gpu_speed refuses to pool two contexts on one
line); it is read here as a check of how far one timing of these cells moves between machines and code
versions, which bounds how much a one-timing verdict in `batch.csv` can be trusted.

    python results/gpu/batch_h100/s21/compare_int8_rep.py
"""
import importlib.util
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("gpu_speed", HERE.parents[3] / "experiments" / "gpu_speed.py")
gpu_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_speed)
reference = pd.read_csv(HERE / "ref_int4" / "batch_rows.csv")  # the table needs it; only throughput is read


def throughput(name: str) -> pd.Series:
    rows = pd.concat([reference, pd.read_csv(HERE / name / "batch_rows.csv")], ignore_index=True)
    t = gpu_speed.batch_table(rows, float(rows.copy_gbps.median()), str(rows.gpu.iloc[0]))
    return t[t.verifier.isin(["int8", "w8a8"])].set_index(["verifier", "drafter", "batch_size"]).throughput


ratio = (throughput("int8_w8a8_rep") / throughput("int8_w8a8")).rename("second / first")
print(ratio.unstack("batch_size").round(3).to_string())
print(f"\nall {len(ratio)} cells: median {ratio.median():.3f}, range {ratio.min():.3f}-{ratio.max():.3f}")
