"""Result store: one directory of parquet row files, where no result is lost or counted twice.

Layout of a result set (`results/<experiment>/` or a chosen `out_dir`):

    manifest.json                 full resolved config, identity, environment, sessions
    cells/<cell_id>.json          the resolved config of each run cell, written once
    rows-<cell_id>-<uuid>.parquet one file per `append` call (the engine appends per prompt)

Every file is written to a temp file in the same directory, fsynced and `os.replace`d into
place, so a killed run leaves either the whole file or nothing; readers ignore temp files.
Resuming reads `done_keys(cell_id)` and skips those (prompt_id, turn) pairs.
One writer per directory at a time (no cross-process lock).
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from quasar_bench.errors import QuasarError

KEY = ["cell_id", "prompt_id", "turn"]
# Fidelity columns may be all-missing in some files (stored as null): load them as float.
FLOAT_COLS = ["kl_mean", "kl_p50", "kl_p95", "kl_max", "top1_agree", "tau", "alpha"]
_CELL_RE = re.compile(r"^[A-Za-z0-9_]+$")


def _canon(obj):
    """JSON round trip: the form in which dicts are stored and compared."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write):
    """Call write(fileobj) on a temp file next to `path`, fsync, then os.replace onto it."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True,
                                                     default=str).encode()))


def git_commit() -> str:
    """HEAD of the repo this package lives in, with '-dirty' if tracked files changed."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def environment() -> dict:
    """Git commit, package versions and hardware, for the manifest."""
    versions = {}
    for pkg in ("quasar_bench", "torch", "transformers", "triton", "numpy", "pandas", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    hw = {"platform": platform.platform(), "machine": platform.machine(),
          "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")  # only describe the GPU if torch is already loaded
    if torch is not None and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_count"] = torch.cuda.device_count()
    return {"git_commit": git_commit(), "python": platform.python_version(),
            "packages": versions, "hardware": hw}


class ResultStore:
    def __init__(self, root):
        self.root = Path(root)
        self._done: dict[str, set] = {}

    # -- set-up ---------------------------------------------------------------------------
    def open(self, manifest: dict) -> "ResultStore":
        """Create the directory and write or validate manifest.json.

        `manifest["identity"]` holds what must not change within one result set (experiment
        name, dataset, max_new_tokens, seed, ...). An existing manifest with another identity
        is an error and nothing is written; a matching one is a resume, logged in `sessions`.
        """
        if "identity" not in manifest:
            raise ValueError("manifest needs an 'identity' sub-dict")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=self.root)
            probe.close()
        except OSError as e:
            raise QuasarError(f"cannot write results to {self.root} ({e.strerror or e}); "
                              f"pick a writable out_dir=") from None
        path = self.root / "manifest.json"
        new = _canon(manifest)
        new.setdefault("environment", _canon(environment()))
        session = {"opened_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "git_commit": new["environment"].get("git_commit", "unknown")}
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise QuasarError(f"{path} is unreadable ({e}); pick another out_dir= "
                                  f"or delete it") from None
            if old.get("identity") != new["identity"]:
                diff = sorted(k for k in set(old.get("identity", {})) | set(new["identity"])
                              if old.get("identity", {}).get(k) != new["identity"].get(k))
                raise QuasarError(f"{self.root} holds rows from a different configuration "
                                  f"(differs in: {', '.join(diff)}); pick another out_dir= "
                                  f"or delete it")
            new["sessions"] = old.get("sessions", []) + [session]
        else:
            new["sessions"] = [session]
        _write_json(path, new)
        (self.root / "cells").mkdir(exist_ok=True)
        for tmp in self.root.glob(".tmp-*"):  # torn writes of a killed run (one writer a dir)
            tmp.unlink(missing_ok=True)
        return self

    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    def record_cell(self, cell_id: str, config: dict):
        """Write cells/<cell_id>.json once; a different config under the same id is an error."""
        self._check_cell(cell_id)
        path = self.root / "cells" / f"{cell_id}.json"
        cfg = _canon(config)
        if path.exists():
            if json.loads(path.read_text()) != cfg:
                raise RuntimeError(f"cell {cell_id} already recorded with another config")
            return
        path.parent.mkdir(exist_ok=True)
        _write_json(path, cfg)

    def cells(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text())
                for p in sorted((self.root / "cells").glob("*.json"))}

    # -- rows -----------------------------------------------------------------------------
    @staticmethod
    def _check_cell(cell_id):
        if not isinstance(cell_id, str) or not _CELL_RE.match(cell_id):
            raise ValueError(f"cell_id must be [A-Za-z0-9_]+, got {cell_id!r}")

    def _files(self, cell_id: str | None = None) -> list[Path]:
        return sorted(self.root.glob(f"rows-{cell_id}-*.parquet" if cell_id else "rows-*.parquet"))

    def done_keys(self, cell_id: str) -> set[tuple[str, int]]:
        """(prompt_id, turn) pairs already stored for this cell."""
        self._check_cell(cell_id)
        if cell_id not in self._done:
            done = set()
            for f in self._files(cell_id):
                t = pq.read_table(f, columns=["prompt_id", "turn"])
                done.update(zip(map(str, t["prompt_id"].to_pylist()), t["turn"].to_pylist()))
            self._done[cell_id] = done
        return set(self._done[cell_id])

    def append(self, rows: list[dict]) -> Path | None:
        """Atomically write rows (all of one cell) as one new parquet file."""
        if not rows:
            return None
        cell_ids = {r["cell_id"] for r in rows}
        if len(cell_ids) != 1:
            raise ValueError(f"append takes rows of one cell, got {sorted(cell_ids)}")
        cell_id = cell_ids.pop()
        keys = [(str(r["prompt_id"]), int(r["turn"])) for r in rows]
        done = self.done_keys(cell_id)
        twice = sorted(set(k for k in keys if k in done or keys.count(k) > 1))
        if twice:
            raise RuntimeError(f"rows {twice} of cell {cell_id} would be stored twice")
        df = pd.DataFrame(rows)
        df["prompt_id"] = df["prompt_id"].astype(str)
        table = pa.Table.from_pandas(df, preserve_index=False)
        path = self.root / f"rows-{cell_id}-{uuid.uuid4().hex}.parquet"
        _atomic_write(path, lambda f: pq.write_table(table, f))
        self._done[cell_id] = done | set(keys)
        return path

    def load(self) -> pd.DataFrame:
        """All rows of this result set; raises if a (cell_id, prompt_id, turn) appears twice."""
        files = self._files()
        if not files:
            return pd.DataFrame(columns=KEY)
        tables = [pq.read_table(f) for f in files]
        tables = [t.append_column("_file", pa.array([f.name] * len(t), pa.string()))
                  for t, f in zip(tables, files)]
        try:  # one conversion; null columns (no fidelity measured) promote to their type
            df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
        dup = df[df.duplicated(KEY, keep=False)]
        if len(dup):
            k = dup.iloc[0]
            raise QuasarError(f"{self.root}: {len(dup)} rows share (cell_id, prompt_id, turn), "
                              f"e.g. {tuple(k[KEY])} in {sorted(set(dup['_file']))[:4]}; "
                              f"delete the extra rows-*.parquet files")
        for c in FLOAT_COLS:
            if c in df:
                df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
        return df.drop(columns="_file")
