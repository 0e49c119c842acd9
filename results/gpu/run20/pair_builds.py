"""Run 20, call 3: int4 verifier throughput of the pdl build over the shipped build, paired per repeat.

The calls ran A B A B on one warm H100 (shipped_0, pdl_0, shipped_1, pdl_1), so repeat r of pdl is
compared with repeat r of shipped; bf16 (reference) cells of each build's run are the control: their
ratio shows the machine's drift between the two builds' runs.

    python results/gpu/run20/pair_builds.py
"""
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent / "e2e"
KEY = ["verifier", "drafter", "batch_size"]


def throughput(build: str, repeat: int) -> pd.Series:
    t = pd.read_csv(HERE / f"{build}_{repeat}" / "batch.csv")
    return t.set_index(KEY)["throughput"]


ratios = pd.concat({r: throughput("pdl", r) / throughput("shipped", r) for r in (0, 1)}, axis=1)
ratios["mean"] = ratios.mean(axis=1)
print("throughput pdl / shipped, per repeat (repeat r of each build timed in the same A B pair)")
print(ratios.round(3).to_string())
