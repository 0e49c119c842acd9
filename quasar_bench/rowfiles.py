"""Result rows read back from files, without changing them: a result directory's row store
(rows-*.parquet), its rows.parquet / rows.csv export, or one rows file; and any CSV result table
(`read_csv_table`: figures, GPU rows files), with one-line errors instead of a parser's traceback.

The store (store.py) writes these files; every reader shares this module (the store's own `load`,
the replay drafter's traces, the Spec-Bench export), so a table reads the same whichever file holds
it. rows.csv holds list columns (per-step acceptance, token ids) as JSON text; files exported before
that hold numpy's print form (`[4 1 1 0]`), which is read too unless numpy elided part of it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import QuasarError

KEY = ["cell_id", "prompt_id", "turn", "repeat"]  # `repeat` numbers a prompt's timings (0, 1, ...)
# Fidelity columns may be all-missing in some files (stored as null): load them as float.
FLOAT_COLS = ["kl_mean", "kl_p50", "kl_p95", "kl_max", "top1_agree", "tau", "alpha"]
LIST_COLS = ["accepted_per_position", "drafted_lengths", "accepted_lengths", "prompt_ids", "output_ids"]
REPAIR = "python -m quasar_bench.store repair"
BAD_READ = (OSError, ValueError, KeyError, TypeError, pa.ArrowException)


def read_table(f: Path, columns=None) -> pa.Table:
    """One rows-*.parquet file (of `columns`, those it has), with its `repeat` column; a damaged
    one raises one of BAD_READ."""
    if columns is not None:  # older files lack newer columns
        names = set(pq.read_schema(f).names)
        columns = [c for c in columns if c in names or c in ("prompt_id", "turn")]
    # files written before write_rows_file carry pandas' schema metadata: dropped, so old and new
    # files convert alike whatever their order
    t = pq.read_table(f, columns=columns).replace_schema_metadata(None)
    missing = [c for c in ("prompt_id", "turn") if c not in t.column_names]
    if missing:
        raise ValueError(f"no column {missing[0]}")
    return with_repeat(t)


def with_repeat(t: pa.Table) -> pa.Table:
    """The table with an int64 `repeat` column: rows written before timings were repeated (no
    column, or nulls) were timed once, as repeat 0."""
    if "repeat" not in t.column_names:
        return t.append_column("repeat", pa.array([0] * len(t), pa.int64()))
    i = t.column_names.index("repeat")
    return t.set_column(i, "repeat", t["repeat"].fill_null(0).cast(pa.int64()))


def reason(e: Exception) -> str:
    return str(e).splitlines()[0][:100] if str(e) else type(e).__name__


def rows_frame(tables: dict[Path, pa.Table], root: Path) -> pd.DataFrame:
    """The rows of the row store's files (read with read_table) as one table; a (cell_id,
    prompt_id, turn, repeat) stored twice is a QuasarError naming the files."""
    if not tables:
        return pd.DataFrame(columns=KEY)
    named = [t.append_column("_file", pa.array([f.name] * len(t), pa.string())) for f, t in tables.items()]
    try:  # one conversion; null columns (no fidelity measured) promote to their type
        df = pa.concat_tables(named, promote_options="permissive").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        df = pd.concat([t.to_pandas() for t in named], ignore_index=True)
    dup = df[df.duplicated(KEY, keep=False)]
    if len(dup):
        k = dup.iloc[0]
        raise QuasarError(f"{root}: {len(dup)} rows share (cell_id, prompt_id, turn, repeat), "
                          f"e.g. {tuple(k[KEY])} in {sorted(set(dup['_file']))[:4]}; "
                          f"delete the extra rows-*.parquet files, or `{REPAIR} {root}` moves them aside")
    for c in FLOAT_COLS:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df.drop(columns="_file")


def read_rows(source) -> pd.DataFrame:
    """The rows of a result directory (its row store, else its rows.parquet, else its rows.csv) or
    of one rows .parquet / .csv file. A damaged file is a QuasarError naming it, never skipped."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        store = sorted(path.glob("rows-*.parquet"))
        if store:
            tables = {}
            for f in store:
                try:
                    tables[f] = read_table(f)
                except BAD_READ as e:
                    raise QuasarError(f"{f} is unreadable ({reason(e)}); `{REPAIR} {path}` moves it aside "
                                      "and the same run command then re-runs its rows") from None
            return rows_frame(tables, path)
        exports = [f for f in (path / "rows.parquet", path / "rows.csv") if f.is_file()]
    else:
        exports = [path] if path.is_file() and path.suffix in (".parquet", ".csv") else []
    if not exports and path.is_dir():
        raise QuasarError(f"{path} holds no rows (no rows-*.parquet, rows.parquet or rows.csv); run the "
                          "experiment with out_dir= there first")
    if not exports:
        raise QuasarError(f"{path}: no such result directory (rows-*.parquet, rows.parquet or rows.csv) or "
                          "rows .parquet / .csv file; pass the out_dir of a run (run it first)")
    f = exports[0]
    try:
        return pd.read_parquet(f) if f.suffix == ".parquet" else _read_csv(f)
    except QuasarError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever pandas or pyarrow raise, one line naming the file
        raise QuasarError(f"{f} is unreadable ({type(e).__name__}: {reason(e)}); re-export it from the "
                          "run's rows-*.parquet (re-running the run command exports again)") from None


def _read_csv(f: Path) -> pd.DataFrame:
    df = pd.read_csv(f, dtype={"prompt_id": str}, keep_default_na=False, na_values=[""])
    for c in LIST_COLS:
        if c in df:
            df[c] = [_list_cell(v, c, f) for v in df[c]]
    return df


def _list_cell(v, column: str, f: Path):
    if not isinstance(v, str):
        return v  # missing: a row without this column
    text = v.strip()
    try:
        out = json.loads(text)
    except ValueError:
        out = None
    if isinstance(out, list):
        return out
    if text.startswith("[") and text.endswith("]") and "..." not in text:
        try:  # numpy's print form, in files exported before list columns were written as JSON
            return [_number(x) for x in text[1:-1].split()]
        except ValueError:
            pass
    raise QuasarError(f"{f}: column {column} holds {text[:40]!r}, not a whole list; read the run's "
                      "rows-*.parquet (pass its directory) instead")


def _number(x: str):
    try:
        return int(x)
    except ValueError:
        return float(x)


def read_csv_table(path: str | Path,
                   fix: str = "restore it (git checkout) or make it again with the command in its .md") -> pd.DataFrame:
    """A CSV result table, or a ValueError naming the file, what is wrong with it (missing,
    unreadable, not CSV, empty) and `fix`, instead of a parser's traceback."""
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        why = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable CSV ({type(e).__name__}: {why}); {fix}") from None
