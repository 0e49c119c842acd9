"""The rows files GPU calls write (`<name>_rows.csv`): reading, checking and joining them into the
rows of one table (`experiments/gpu_speed.py --from-rows`).

A table speaks for one machine and holds one cell per line, each line pooling only the repeats of
that cell; a stopped call's unfinished cells are left out. Every refusal is a ValueError naming the
file or the line and what to pass instead.
"""
from __future__ import annotations

import sys

import pandas as pd

from .rowfiles import read_csv_table

MACHINE_COLUMNS = ("gpu", "driver", "torch", "triton")
# what each table reads from a rows file; a file without them was not written by experiments/gpu_speed.py
ROW_COLUMNS = {"verifier", "drafter", "prompt_id", "new_tokens", "verify_steps", "weight_bytes", "baseline", "copy_gbps"}
BATCH_COLUMNS = {"batch_size", "batch_id", "batch_decode_s", "batch_steps", "gemm_rows_per_step", "batch_padding"}
E2E_COLUMNS = {"decode_s", "draft_s", "verify_s", "drafted", "accepted"}
NUMERIC_COLUMNS = (ROW_COLUMNS | BATCH_COLUMNS | E2E_COLUMNS) - {"verifier", "drafter", "prompt_id", "baseline", "batch_id"}


def read_rows_file(path: str, batched: bool) -> pd.DataFrame:
    """One rows file for --from-rows, or a ValueError naming the file and what is wrong with it."""
    rows = read_csv_table(path, fix="pass the *_rows.csv files a GPU call wrote")
    for col in sorted(NUMERIC_COLUMNS & set(rows.columns)):
        as_number = pd.to_numeric(rows[col], errors="coerce")
        bad = as_number.isna() & rows[col].notna()
        if bad.any():
            raise ValueError(f"{path}: column {col} holds a non-number ({rows[col][bad].iloc[0]!r} on data line "
                             f"{int(bad.idxmax()) + 1}): the file is damaged; take it again from the GPU call's output")
        rows[col] = as_number
    if not batched and "batch_size" in rows and (rows["batch_size"] > 1).any():
        raise ValueError(f"{path}: holds batched rows (B up to {int(rows['batch_size'].max())}): tabulate them with "
                         "--experiment gpu_batch (or gpu_batch_replay)")
    missing = (ROW_COLUMNS | (BATCH_COLUMNS if batched else E2E_COLUMNS)) - set(rows.columns)
    if missing:
        kind = "a batch experiment's" if batched else "an end-to-end (gpu_speed / gpu_replay)"
        named = sorted(missing)[:5] + ([f"and {len(missing) - 5} more"] if len(missing) > 5 else [])
        raise ValueError(f"{path}: not {kind} rows file (no column {', '.join(named)}); pass the "
                         f"*_rows.csv a GPU call of that experiment wrote")
    if rows.empty:
        raise ValueError(f"{path}: holds no rows; a call that timed nothing has nothing to tabulate")
    return rows


def check_one_machine(frames: list[pd.DataFrame], names: list[str]) -> None:
    """Refuse (ValueError) rows files whose hardware or version columns differ: the table's header
    names one GPU and one torch, and a speedup paired across an H100 and an H200 means nothing."""
    for col in MACHINE_COLUMNS:
        where: dict[str, str] = {}
        for f, name in zip(frames, names):
            for v in f[col].dropna().astype(str).unique() if col in f else ():
                where.setdefault(v, name)
        if len(where) > 1:
            seen = ", ".join(f"{v!r} ({n})" for v, n in where.items())
            raise ValueError(f"the rows come from different machines: {col} {seen}; "
                             "one table holds one GPU and one software stack: pass only that machine's rows files")


def join_row_files(frames: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """Rows of several calls as one table. A cell (`cell_id`) that an earlier file already holds is
    a further timing of it (the same cells run again, e.g. on the same warm machine to measure the
    spread): its repeats are numbered after the earlier files' and its batch ids made unique, so the
    tables pair the timings repeat by repeat instead of pooling them as one. The same rows given
    twice (equal `timed_at`) are refused with a ValueError, as are files from different GPUs or
    software versions: one table speaks for one machine kind."""
    check_one_machine(frames, names)
    if not all({"cell_id", "repeat"} <= set(f.columns) for f in frames):
        return pd.concat(frames, ignore_index=True)
    seen: dict[str, int] = {}  # cell -> the next free repeat number
    stamps: dict[tuple, str] = {}
    out = []
    for i, (f, name) in enumerate(zip(frames, names)):
        f = f.copy()
        if "timed_at" in f:
            for key in set(zip(f["cell_id"], f["timed_at"])):
                if key in stamps:
                    raise ValueError(f"{name} holds rows of {stamps[key]} again (same cell, same timed_at): "
                                     "pass each rows file once")
                stamps[key] = name
        offset = f["cell_id"].map(lambda c: seen.get(c, 0))
        if (offset > 0).any():
            f["repeat"] = f["repeat"].astype(int) + offset
            if "batch_id" in f:
                f.loc[offset > 0, "batch_id"] = f.loc[offset > 0, "batch_id"].astype(str) + f"@{i}"
        for c, r in f.groupby("cell_id")["repeat"].max().items():
            seen[c] = int(r) + 1
        out.append(f)
    return pd.concat(out, ignore_index=True)


def complete_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the cells that finished: a cell (per repeat) with fewer rows than the fullest was
    stopped mid-way (a `timeout`'s partial file), and its throughput would describe only the
    batches it reached. Each dropped cell is named on stderr."""
    key = ["cell_id"] if "cell_id" in rows else [c for c in ("verifier", "drafter", "batch_size") if c in rows]
    key += ["repeat"] if "repeat" in rows else []
    counts = rows.groupby(key).size()
    short = counts[counts < counts.max()]
    for cell, n in short.items():
        r = rows.set_index(key).loc[cell]
        r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
        rep = f" (repeat {cell[-1]})" if "repeat" in key and rows["repeat"].nunique() > 1 else ""
        print(f"gpu_speed: dropped the unfinished cell {r.get('verifier', cell)} / {r.get('drafter', '')} / "
              f"B={r.get('batch_size', 1)}{rep}: {n} of {counts.max()} rows", file=sys.stderr)
    return rows.set_index(key).drop(index=short.index).reset_index()


def check_one_cell_per_row_of_table(rows: pd.DataFrame, keys: list[str]) -> None:
    """Refuse (ValueError) rows where one line of the table (e.g. int8 / ar / B=1) would pool two
    different cells: the same labels run under another code version, model, prompt set or setting
    (another `context_id`). Their batch ids coincide, so pooling them would count one cell's tokens
    against the other's time; only repeats of one cell (one `cell_id`) belong on one line."""
    if "cell_id" not in rows:
        return
    n = rows.groupby(keys, sort=False)["cell_id"].nunique()
    if (n > 1).any():
        line = n[n > 1].index[0]
        ctx = rows.set_index(keys).loc[[line]]
        ctx = sorted(ctx["context_id"].astype(str).str[:6].unique()) if "context_id" in ctx else []
        raise ValueError(f"the rows hold {n[line]} different cells for {' / '.join(map(str, line))}"
                         f"{' (contexts ' + ', '.join(ctx) + ')' if ctx else ''}: the same labels run with another code "
                         "version, model, prompt set or setting; a line of the table pools one cell's repeats only: "
                         "pass rows of one context (rerun the comparators in the same code version)")
