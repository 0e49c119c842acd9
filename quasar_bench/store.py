"""Result store: one directory of parquet row files, where no result is lost, mixed or counted twice.

Layout of a result set (`results/<experiment>/` or a chosen `out_dir`):

    manifest.json                 full resolved config, identity, environment, sessions
    cells/<cell_id>.json          the resolved config of each run cell, written once
    cells/<cell_id>.lock          held while a run writes that cell (pid, host, start time)
    rows-<cell_id>-<uuid>.parquet one file per `append` call (the engine appends per prompt)
    .lock                         held while a run opens the store (or for the whole run: exclusive=True)
    damaged/                      unreadable or duplicated files moved aside (never deleted)
    rows.parquet, rows.csv, summary.csv   exports over all rows (`export`)

Every file is written to a temp file `.tmp-<pid>@<host>-*` in the same directory, fsynced and
`os.replace`d into place, so a killed run leaves either the whole file or nothing; readers ignore
temp files, and `open` removes those whose writer is gone.
A row is one (cell_id, prompt_id, turn, repeat): `repeat` numbers the timings of a prompt
(rows written before timings were repeated have no such column and read as repeat 0).
Resuming reads `done_keys(cell_id)` and skips those (prompt_id, turn, repeat) triples.

Locks: a cell is written by one live process at a time (`cells/<cell_id>.lock`, taken by
`record_cell` or the first `append` of that cell and held until `close()` or interpreter exit), so
parallel sweep jobs writing different cells can share one directory while two runs of the same
cell cannot. A lock whose holder is gone (its flock is free, or its pid is dead on this host) is
taken over with a warning. `python -m quasar_bench.store check|repair DIR` inspects and repairs a
result set.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from importlib import metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from quasar_bench.errors import QuasarError
from quasar_bench.fileio import (atomic_write, atomic_write_bytes, atomic_write_text, fsync_dir, host_tag, json_cell,  # noqa: F401
                                 tmp_prefix, write_json)
from quasar_bench.rowfiles import BAD_READ as _BAD_READ
from quasar_bench.rowfiles import (KEY, LIST_COLS, read_table, reason, rows_frame,  # noqa: F401 (KEY: the store's row key)
                                   with_repeat)
from quasar_bench.rowfiles import REPAIR as _REPAIR

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

log = logging.getLogger(__name__)

_CELL_RE = re.compile(r"^[A-Za-z0-9_]+$")
_TMP_RE = re.compile(r"^\.tmp-(\d+)@([A-Za-z0-9]*)-")
_ROWS_RE = re.compile(r"^rows-([A-Za-z0-9_]+)-[^.]+\.parquet$")
OTHER_HOST_TEMP_AGE_S = 24 * 3600  # a temp file of another host is stale after this long
LEGACY_TEMP_AGE_S = 600            # a temp file without a pid tag is stale after this long


def _canon(obj):
    """JSON round trip: the form in which dicts are stored and compared."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _host() -> str:
    return socket.gethostname()


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


# -- locks ---------------------------------------------------------------------------------------
def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _flock_free(fd) -> bool | None:
    """True if no process holds a flock on fd's file (the probe lock is kept), False if one
    does, None where flock is unavailable."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _read_lock_info(path: Path) -> dict | None:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def _lock_state(path: Path) -> tuple[str, dict | None, str]:
    """('free'|'held'|'stale', info, reason) of a lock file, without changing it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "free", None, ""
    except OSError as e:
        return "held", None, str(e)
    try:
        info = _read_lock_info(path)
        reason = _stale_reason(info, _flock_free(fd), os.fstat(fd).st_mtime)
    finally:
        os.close(fd)
    return ("stale" if reason else "held"), info, reason or ""


def _stale_reason(info, flock_free, mtime) -> str | None:
    """Why a lock is stale, or None if its holder may be alive."""
    if info is None:
        if flock_free:
            return "its lock file is unreadable and no process holds it"
        if flock_free is None and time.time() - mtime > 60:
            return "its lock file is unreadable"
        return None
    if info.get("host") == _host() and not _pid_alive(info.get("pid")):
        return f"pid {info.get('pid')} is gone"
    if flock_free:
        return "no process holds it"
    return None


def _in_use(root: Path, info: dict | None, what: str = "") -> QuasarError:
    who = (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
           if info else "another process")
    return QuasarError(f"{root} is in use by {who}{what}; wait for it or pick another out_dir=")


def _write_and_flock(fd: int, data: bytes) -> None:
    """Fill a new lock file and hold its flock (where the platform has one)."""
    os.write(fd, data)
    os.fsync(fd)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


class _Lock:
    """An exclusive lock file (O_CREAT|O_EXCL semantics plus a flock on it where available)."""

    def __init__(self, path: Path, root: Path, what: str = "", extra: dict | None = None):
        self.path, self.root, self.what, self.extra = Path(path), Path(root), what, extra or {}
        self.fd = None
        self.ino = None
        self.pid = None

    def acquire(self, wait_s: float = 0.0):
        deadline = time.monotonic() + wait_s
        for _ in range(10_000):
            if self._try_create():
                return self
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(fd)
                info = _read_lock_info(self.path)
                reason = _stale_reason(info, _flock_free(fd), st.st_mtime)
                try:
                    same = os.stat(self.path).st_ino == st.st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # replaced while we looked
                    continue
                if reason is None:
                    if time.monotonic() < deadline and not (info or {}).get("exclusive"):
                        time.sleep(0.05)
                        continue
                    raise _in_use(self.root, info, self.what)
                who = f"pid {info.get('pid')} on host {info.get('host')}" if info else "an unknown run"
                log.warning("taking over the stale lock %s of %s (%s)", self.path, who, reason)
                os.unlink(self.path)  # we hold its flock (if any): no one else takes it over now
            finally:
                os.close(fd)
        raise QuasarError(f"could not take the lock {self.path}; delete it if no run uses {self.root}")

    def _try_create(self) -> bool:
        """Create the lock file whole (content and flock in place before it appears)."""
        info = {"pid": os.getpid(), "host": _host(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv[:8], **self.extra}
        data = json.dumps(info, indent=1).encode()
        tmp = self.path.parent / f"{tmp_prefix()}{uuid.uuid4().hex}.lock"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            _write_and_flock(fd, data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                os.close(fd)
                fd = None
                return False
            except OSError:  # no hard links on this file system: O_EXCL create
                try:
                    fd2 = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                except FileExistsError:
                    os.close(fd)
                    fd = None
                    return False
                os.close(fd)
                fd = fd2
                _write_and_flock(fd, data)
            self.fd, self.ino, self.pid = fd, os.fstat(fd).st_ino, os.getpid()
            fd = None
            return True
        finally:
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def release(self):
        _release(self.path, self.fd, self.ino, self.pid)
        self.fd = None


def _release(path, fd, ino, pid):
    if fd is None or pid != os.getpid():  # a forked child never releases its parent's lock
        return
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _release_all(locks: dict):
    for lk in list(locks.values()):
        lk.release()
    locks.clear()


# -- the store -----------------------------------------------------------------------------------
def write_rows_file(path: Path, table: pa.Table) -> None:
    """One row file, atomically. Without pandas' schema metadata (it restores nothing these plain
    columns need; readers drop it: rowfiles.read_table) and without column statistics (row files are
    always read whole): their ~70 columns' metadata was most of a one-row file (41 KB -> ~16 KB)."""
    table = table.replace_schema_metadata(None)
    atomic_write(path, lambda f: pq.write_table(table, f, write_statistics=False))


class ResultStore:
    def __init__(self, root):
        self.root = Path(root)
        self._done: dict[str, set] = {}
        self._locks: dict[str, _Lock] = {}
        self._pending: dict | None = None  # this run's manifest + session, written at its first cell lock
        self._wait_s = 10.0
        # released by close(), when the store is garbage collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, _release_all, self._locks)

    # -- set-up ---------------------------------------------------------------------------
    def open(self, manifest: dict, exclusive: bool = False, wait_s: float = 10.0) -> "ResultStore":
        """Create the directory and write or validate manifest.json.

        `manifest["identity"]` holds what must not change within one result set (experiment
        name, dataset, max_new_tokens, seed, ...). An existing manifest with another identity
        is an error and nothing is written; a matching one is a resume, logged in `sessions`.

        Takes `out_dir/.lock` while it works (waiting up to `wait_s` for another run's open);
        with exclusive=True it keeps it until close(), and fails if another live run holds it or
        any cell lock. Without, cells are locked as they are written (see `record_cell`).
        """
        if "identity" not in manifest:
            raise ValueError("manifest needs an 'identity' sub-dict")
        self._wait_s = wait_s
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(prefix=tmp_prefix() + "probe-", dir=self.root)
            probe.close()
        except OSError as e:
            raise QuasarError(f"cannot write results to {self.root} ({e.strerror or e}); "
                              f"pick a writable out_dir=") from None
        if "dir" not in self._locks:
            lk = _Lock(self.root / ".lock", self.root, extra={"exclusive": bool(exclusive)})
            self._locks["dir"] = lk.acquire(wait_s=0.0 if exclusive else wait_s)
        try:
            if exclusive:
                for p in sorted((self.root / "cells").glob("*.lock")):
                    if p.stem not in self._locks:
                        state, info, _ = _lock_state(p)
                        if state == "held":
                            raise _in_use(self.root, info, f" (cell {p.stem})")
            self._open_manifest(manifest, log_session=exclusive)
            (self.root / "cells").mkdir(exist_ok=True)
            for tmp in _stale_temps(self.root):  # torn writes of killed runs
                tmp.unlink(missing_ok=True)
        except BaseException:
            if not exclusive:
                self._locks.pop("dir").release()
            else:
                self.close()
            raise
        if not exclusive:
            self._locks.pop("dir").release()
        return self

    def _open_manifest(self, manifest: dict, log_session: bool):
        """Create manifest.json, or check this run's identity against it. The run's session entry
        (and its config / environment) is written now with `log_session`, else at its first cell
        lock (`_log_session`): a run refused by another one's cell lock leaves no trace."""
        path = self.root / "manifest.json"
        new = _canon(manifest)
        new.setdefault("environment", _canon(environment()))
        session = {"opened_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                   "host": _host(), "git_commit": new["environment"].get("git_commit", "unknown")}
        old = self._read_manifest(missing_ok=True)
        if old is not None:
            self._compare_identity(old, new["identity"])
            if old.get("rebuilt"):
                log.warning("%s was rebuilt by `%s`; this run's identity matches it", path, _REPAIR)
        self._pending = {**new, "sessions": [session]}
        if log_session:
            self._write_session(old)
        elif old is None:
            write_json(path, {**new, "sessions": []})

    def _write_session(self, old: dict | None) -> None:
        new, self._pending = self._pending, None
        sessions = (old or {}).get("sessions", []) + new["sessions"]
        write_json(self.root / "manifest.json", {**new, "sessions": sessions})

    def _log_session(self) -> None:
        """Append this run's session to the manifest (under the directory lock), once."""
        if self._pending is None:
            return
        if "dir" in self._locks:  # exclusive runs hold it already
            self._write_session(self._read_manifest(missing_ok=True))
            return
        lk = _Lock(self.root / ".lock", self.root).acquire(wait_s=self._wait_s)
        try:
            self._write_session(self._read_manifest(missing_ok=True))
        finally:
            lk.release()

    def _read_manifest(self, missing_ok: bool = False) -> dict | None:
        """The manifest, or None when there is none and nothing else is stored either."""
        path = self.root / "manifest.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            stored = len(self._files()) + len(list((self.root / "cells").glob("*.json")))
            if stored:
                raise QuasarError(f"{self.root} holds {stored} row/cell files but no manifest.json; "
                                  f"rebuild it with `{_REPAIR} {self.root}` or delete {self.root}") from None
            if missing_ok:
                return None
            raise QuasarError(f"{path} does not exist: {self.root} is not a result set") from None
        except (OSError, UnicodeDecodeError) as e:
            raise QuasarError(f"{path} is unreadable ({e}); fix its permissions, or pick "
                              f"another out_dir=") from None
        try:
            m = json.loads(text)
            if not isinstance(m, dict) or not isinstance(m.get("identity"), dict):
                raise ValueError("no 'identity' object")
        except ValueError as e:
            raise QuasarError(f"{path} is damaged ({str(e)[:80]}); rebuild it from the stored rows "
                              f"with `{_REPAIR} {self.root}` or delete {self.root}") from None
        return m

    def _compare_identity(self, old: dict, identity: dict):
        new = _canon(identity)
        if old.get("identity") != new:
            diff = sorted(k for k in set(old["identity"]) | set(new)
                          if old["identity"].get(k) != new.get(k))
            raise QuasarError(f"{self.root} holds rows from a different configuration "
                              f"(differs in: {', '.join(diff)}); pick another out_dir= "
                              f"or delete it")

    def check_identity(self, identity: dict) -> None:
        """Raise the one-line QuasarError that open() would for this identity, writing nothing:
        a different configuration, a damaged manifest, or rows without a manifest."""
        old = self._read_manifest(missing_ok=True)
        if old is not None:
            self._compare_identity(old, identity)

    def manifest(self) -> dict:
        return self._read_manifest()

    def close(self) -> None:
        """Release this store's locks (also done at garbage collection and interpreter exit)."""
        _release_all(self._locks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _lock_cell(self, cell_id: str):
        if cell_id in self._locks:
            return
        (self.root / "cells").mkdir(parents=True, exist_ok=True)
        lk = _Lock(self.root / "cells" / f"{cell_id}.lock", self.root, f" (cell {cell_id})",
                   extra={"cell_id": cell_id})
        self._locks[cell_id] = lk.acquire()
        self._done.pop(cell_id, None)  # another run may have stored rows meanwhile: re-read
        self._log_session()

    def record_cell(self, cell_id: str, config: dict):
        """Lock the cell for this run, then write cells/<cell_id>.json once; a different config
        under the same id is an error; a damaged file is rewritten from `config`."""
        self._check_cell(cell_id)
        self._lock_cell(cell_id)
        path = self.root / "cells" / f"{cell_id}.json"
        cfg = _canon(config)
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError) as e:
                log.warning("%s was damaged (%s); rewrote it from this run's cell config",
                            path, str(e)[:80])
            else:
                if old != cfg:
                    raise RuntimeError(f"cell {cell_id} already recorded with another config")
                return
        write_json(path, cfg)

    def has_cell(self, cell_id: str) -> bool:
        """Whether cells/<cell_id>.json exists and reads as JSON."""
        try:
            json.loads((self.root / "cells" / f"{cell_id}.json").read_text())
            return True
        except (OSError, ValueError, UnicodeDecodeError):
            return False

    def cells(self) -> dict[str, dict]:
        out = {}
        for p in sorted((self.root / "cells").glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError, UnicodeDecodeError) as e:
                log.warning("%s is damaged (%s), skipped; re-run that cell's command to rewrite it, "
                            "or `%s %s` to move it aside", p, str(e)[:80], _REPAIR, self.root)
        return out

    # -- rows -----------------------------------------------------------------------------
    @staticmethod
    def _check_cell(cell_id):
        if not isinstance(cell_id, str) or not _CELL_RE.match(cell_id):
            raise ValueError(f"cell_id must be [A-Za-z0-9_]+, got {cell_id!r}")

    def _files(self, cell_id: str | None = None) -> list[Path]:
        return sorted(self.root.glob(f"rows-{cell_id}-*.parquet" if cell_id else "rows-*.parquet"))

    def _read(self, f: Path, columns=None) -> pa.Table | None:
        """One rows file (with its `repeat` column, 0 for rows from before repeats), or None after
        moving an unreadable one aside (with a warning)."""
        try:
            return read_table(f, columns)
        except FileNotFoundError:
            return None  # moved aside by another reader meanwhile
        except _BAD_READ as e:
            dest = _move_aside(self.root, f)
            if dest is not None:
                log.warning("%s is unreadable (%s); moved it to %s: its rows count as not stored "
                            "and a run of the same command re-runs them", f, reason(e), dest.parent)
            else:
                log.warning("%s is unreadable (%s), skipped: its rows count as not stored; "
                            "`%s %s` moves it aside", f, reason(e), _REPAIR, self.root)
            return None

    def done_keys(self, cell_id: str) -> set[tuple[str, int, int]]:
        """(prompt_id, turn, repeat) triples already stored for this cell."""
        self._check_cell(cell_id)
        if cell_id not in self._done:
            done = set()
            for f in self._files(cell_id):
                t = self._read(f, columns=["prompt_id", "turn", "repeat"])
                if t is not None:
                    done.update(_keys(t))
            self._done[cell_id] = done
        return set(self._done[cell_id])

    def outputs(self, cell_id: str) -> dict[tuple[str, int], list[int]]:
        """(prompt_id, turn) -> the output ids stored for this cell (its lowest repeat): what a
        later repeat of a greedy cell must generate again."""
        self._check_cell(cell_id)
        found = {}
        for f in self._files(cell_id):
            t = self._read(f, columns=["prompt_id", "turn", "repeat", "output_ids"])
            if t is None or "output_ids" not in t.column_names:
                continue
            for (pid, turn, rep), ids in zip(_keys(t), t["output_ids"].to_pylist()):
                if (pid, turn) not in found or rep < found[(pid, turn)][0]:
                    found[(pid, turn)] = (rep, list(ids))
        return {k: ids for k, (_, ids) in found.items()}

    def append(self, rows: list[dict]) -> Path | None:
        """Atomically write rows (all of one cell) as one new parquet file."""
        if not rows:
            return None
        cell_ids = {r["cell_id"] for r in rows}
        if len(cell_ids) != 1:
            raise ValueError(f"append takes rows of one cell, got {sorted(cell_ids)}")
        cell_id = cell_ids.pop()
        self._check_cell(cell_id)
        self._lock_cell(cell_id)
        keys = [(str(r["prompt_id"]), int(r["turn"]), int(r.get("repeat", 0))) for r in rows]
        done = self.done_keys(cell_id)
        twice = sorted(set(k for k in keys if k in done or keys.count(k) > 1))
        if twice:
            raise RuntimeError(f"rows {twice} of cell {cell_id} would be stored twice")
        df = pd.DataFrame(rows)
        df["prompt_id"] = df["prompt_id"].astype(str)
        df["repeat"] = pd.to_numeric(df["repeat"]).astype("int64") if "repeat" in df else 0
        path = self.root / f"rows-{cell_id}-{uuid.uuid4().hex}.parquet"
        write_rows_file(path, pa.Table.from_pandas(df, preserve_index=False))
        self._done[cell_id] = done | set(keys)
        return path

    def load(self) -> pd.DataFrame:
        """All rows of this result set; raises if a (cell_id, prompt_id, turn, repeat) appears twice.
        An unreadable rows file is moved to damaged/ with a warning (its rows are missing)."""
        tables = {f: t for f in self._files() if (t := self._read(f)) is not None}
        return rows_frame(tables, self.root)

    # -- exports --------------------------------------------------------------------------
    def export(self, df: pd.DataFrame, summary_df: pd.DataFrame | None = None) -> list[Path]:
        """Write rows.parquet, rows.csv and (given a summary) summary.csv, each atomically: a
        reader or a killed run sees the previous file or the whole new one. List-valued cells
        (per-step acceptance, token ids, the acceptance curve) are written as JSON lists, whole
        (numpy's print form would elide long ones)."""
        out = [self.root / "rows.parquet", self.root / "rows.csv"]
        atomic_write(out[0], lambda f: df.to_parquet(f, index=False))
        lists = {c: df[c].map(json_cell) for c in LIST_COLS if c in df}
        atomic_write_text(out[1], df.assign(**lists).to_csv(index=False))
        if summary_df is not None:
            from quasar_bench.summary import save

            out.append(self.root / "summary.csv")
            save(summary_df, out[2])
        return out


def _keys(t: pa.Table) -> list[tuple[str, int, int]]:
    """(prompt_id, turn, repeat) of every row of a rows table read through with_repeat."""
    return list(zip(map(str, t["prompt_id"].to_pylist()), t["turn"].to_pylist(), t["repeat"].to_pylist()))


# -- inspection and repair -----------------------------------------------------------------------
def _move_aside(root: Path, f: Path) -> Path | None:
    """Move f into root/damaged/ (never over another file); None if that failed."""
    dest_dir = Path(root) / "damaged"
    try:
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f.name
        if dest.exists():
            dest = dest_dir / f"{f.stem}-{uuid.uuid4().hex[:8]}{f.suffix}"
        os.replace(f, dest)
        fsync_dir(dest_dir)
        return dest
    except FileNotFoundError:
        return dest_dir / f.name
    except OSError:
        return None


def _stale_temps(root: Path) -> list[Path]:
    """Temp files whose writer is gone: same host and dead pid, or old enough."""
    root, now, host = Path(root), time.time(), host_tag()
    out = []
    for d in (root, root / "cells"):
        for p in sorted(d.glob(".tmp-*")):
            try:
                age = now - p.stat().st_mtime
            except OSError:
                continue
            m = _TMP_RE.match(p.name)
            if m is None:
                stale = age > LEGACY_TEMP_AGE_S
            elif m.group(2) == host:
                stale = not _pid_alive(int(m.group(1)))
            else:
                stale = age > OTHER_HOST_TEMP_AGE_S
            if stale:
                out.append(p)
    return out


def _scan(root: Path) -> dict:
    """Everything `check` reports, read-only."""
    root = Path(root)
    rep = {"cells": {}, "rows": {}, "unreadable": [], "damaged_cells": [], "dup_keys": 0,
           "dup_files": [], "orphan_cells": [], "temps": [], "locks": [], "manifest": None,
           "tables": {}}
    try:
        if not (root / "manifest.json").exists():
            rep["manifest"] = "missing"
            rep["manifest_problem"] = f"{root / 'manifest.json'} is missing"
        else:
            m = ResultStore(root)._read_manifest()
            rep["manifest"] = "rebuilt" if m.get("rebuilt") else "ok"
    except QuasarError as e:
        rep["manifest"] = "bad"
        rep["manifest_problem"] = str(e)
    for p in sorted((root / "cells").glob("*.json")):
        try:
            rep["cells"][p.stem] = json.loads(p.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            rep["damaged_cells"].append((p, str(e)[:80]))
    keys = {}
    for f in sorted(root.glob("rows-*.parquet")):
        try:
            t = with_repeat(pq.read_table(f))
            ks = [(c, *k) for c, k in zip(t["cell_id"].to_pylist(), _keys(t))]
        except _BAD_READ as e:
            rep["unreadable"].append((f, (str(e).splitlines() or [type(e).__name__])[0][:100]))
            continue
        rep["tables"][f] = (t, ks)
        for k in ks:
            keys.setdefault(k, []).append(f)
            rep["rows"][k[0]] = rep["rows"].get(k[0], 0) + 1
    dups = {k: fs for k, fs in keys.items() if len(fs) > 1}
    rep["dup_keys"] = len(dups)
    rep["dup_files"] = sorted({f for fs in dups.values() for f in fs})
    known = set(rep["cells"]) | {p.stem for p, _ in rep["damaged_cells"]}
    rep["orphan_cells"] = sorted(c for c in rep["rows"] if c not in known)
    rep["temps"] = _stale_temps(root)
    for p in [root / ".lock"] + sorted((root / "cells").glob("*.lock")):
        state, info, reason = _lock_state(p)
        if state != "free":
            rep["locks"].append((p, state, info, reason))
    return rep


def _problems(rep: dict) -> list[str]:
    out = []
    if rep["manifest"] in ("missing", "bad"):
        out.append(rep["manifest_problem"])
    out += [f"unreadable: {f} ({why})" for f, why in rep["unreadable"]]
    out += [f"damaged: {p} ({why})" for p, why in rep["damaged_cells"]]
    if rep["dup_keys"]:
        out.append(f"duplicated: {rep['dup_keys']} (cell_id, prompt_id, turn, repeat) keys stored more than "
                   f"once, in {', '.join(f.name for f in rep['dup_files'][:6])}")
    out += [f"rows of cell {c} have no cells/{c}.json" for c in rep["orphan_cells"]]
    out += [f"stale temp file: {p}" for p in rep["temps"]]
    out += [f"stale lock: {p} ({reason})" for p, state, _, reason in rep["locks"] if state == "stale"]
    return out


def check(root) -> int:
    """Print a report of the result set at root; 0 when clean, 1 when problems were found."""
    root = Path(root)
    rep = _scan(root)
    n_rows = sum(rep["rows"].values())
    print(f"{root}: manifest {rep['manifest']}, {len(rep['cells'])} cells, {n_rows} rows "
          f"in {len(rep['tables'])} files")
    for c in sorted(set(rep["cells"]) | set(rep["rows"])):
        print(f"  cell {c}: {rep['rows'].get(c, 0)} rows")
    for p, state, info, _ in rep["locks"]:
        if state == "held":
            who = f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}" \
                if info else "an unknown process"
            print(f"  in use: {p.relative_to(root)} held by {who} (rows may still be added)")
    problems = _problems(rep)
    if not problems:
        print("ok: no problems found")
        return 0
    print(f"{len(problems)} problem(s):")
    for p in problems:
        print(f"  {p}")
    print(f"fix: `{_REPAIR} {root}` (moves damaged files to {root / 'damaged'}, never deletes)")
    return 1


def _rebuild_identity(rep: dict) -> dict:
    """The run identity recoverable from cell configs and rows: each key with one value."""
    vals: dict[str, set] = {}
    for cfg in rep["cells"].values():
        if isinstance(cfg, dict):
            for k in ("max_new_tokens", "seed"):
                if k in cfg:
                    vals.setdefault(k, set()).add(json.dumps(cfg[k]))
            if isinstance(cfg.get("device"), str):
                vals.setdefault("device", set()).add(json.dumps(cfg["device"].split(":")[0]))
    for t, _ in rep["tables"].values():
        if "experiment" in t.column_names:
            for v in set(t["experiment"].to_pylist()):
                vals.setdefault("experiment", set()).add(json.dumps(v))
    return {k: json.loads(next(iter(v))) for k, v in sorted(vals.items()) if len(v) == 1}


def repair(root) -> int:
    """Move unreadable/duplicated/torn files into root/damaged/ (never deletes), drop stale locks
    and rebuild a missing or damaged manifest from what is stored. 0 when clean afterwards."""
    root = Path(root)
    store = ResultStore(root)
    store._locks["dir"] = _Lock(root / ".lock", root, extra={"exclusive": True, "repair": True}).acquire()
    try:
        for p in sorted((root / "cells").glob("*.lock")):
            state, info, _ = _lock_state(p)
            if state == "held":
                raise _in_use(root, info, f" (cell {p.stem})")
            if state == "stale":
                p.unlink(missing_ok=True)
                print(f"removed stale lock {p}")
        rep = _scan(root)
        for f, why in rep["unreadable"]:
            print(f"moved unreadable {f.name} ({why}) to {_move_aside(root, f)}")
        for p, why in rep["damaged_cells"]:
            print(f"moved damaged {p.relative_to(root)} ({why}) to {_move_aside(root, p)}; "
                  f"the next run of that cell rewrites it")
        for p in rep["temps"]:
            print(f"moved stale temp file {p.name} to {_move_aside(root, p)}")
        if rep["dup_files"]:  # keep the oldest copy of every key, file by file
            seen = set()
            by_age = sorted(rep["tables"], key=lambda f: (f.stat().st_mtime_ns, f.name))
            for f in by_age:
                t, ks = rep["tables"][f]
                keep = [i for i, k in enumerate(ks) if k not in seen and k not in ks[:i]]
                seen.update(ks)
                if len(keep) == len(ks):
                    continue
                if keep:
                    cell = ks[0][0]
                    new = root / f"rows-{cell}-{uuid.uuid4().hex}.parquet"
                    write_rows_file(new, t.take(pa.array(keep)))
                    print(f"wrote the {len(keep)} rows of {f.name} not stored elsewhere to {new.name}")
                print(f"moved {f.name} ({len(ks) - len(keep)} duplicated rows) to {_move_aside(root, f)}")
        if rep["manifest"] in ("missing", "bad"):
            path = root / "manifest.json"
            if path.exists():
                print(f"moved damaged manifest.json to {_move_aside(root, path)}")
            rep = _scan(root)
            ident = _rebuild_identity(rep)
            write_json(path, {"identity": ident, "rebuilt": True, "config": None,
                              "environment": _canon(environment()),
                              "sessions": [{"rebuilt_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                            "pid": os.getpid(), "host": _host()}]})
            print(f"rebuilt manifest.json (identity {ident}) from {len(rep['cells'])} cells and "
                  f"{len(rep['tables'])} rows files; a run whose identity differs is refused")
    finally:
        store.close()
    print("after repair:")
    return check(root)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quasar_bench.store",
                                 description="Inspect or repair a result set (out_dir).")
    ap.add_argument("command", choices=["check", "repair"],
                    help="check: report problems (exit 0 clean, 1 problems); repair: move damaged "
                         "files to DIR/damaged/ and rebuild a missing manifest")
    ap.add_argument("dir", type=Path)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if not args.dir.is_dir():
        print(f"quasar_bench.store: error: {args.dir} is not a directory; pass an out_dir",
              file=sys.stderr)
        return 2
    try:
        return check(args.dir) if args.command == "check" else repair(args.dir)
    except QuasarError as e:
        print(f"quasar_bench.store: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
