"""Files the package writes: one atomic write, one cache root.

Every file the package produces (result rows, manifests, caches of quantized verifiers, search
results, calibration sets, exports) is written to a temp file in the target's directory, fsynced
and `os.replace`d onto the target: a killed process leaves either the old file or the new one,
never a torn one. Readers ignore names starting with `.tmp-`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temp files are `.tmp-<pid>@<host>-*`: a store can tell a dead writer's leftovers


def host_tag(host: str | None = None) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", host if host is not None else socket.gethostname())[:32]


def tmp_prefix() -> str:
    return f"{TMP_PREFIX}{os.getpid()}@{host_tag()}-"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where caches live: `override`, else $QUASAR_CACHE, else ~/.cache/quasar_bench."""
    return Path(os.path.expanduser(str(override or os.environ.get("QUASAR_CACHE") or "~/.cache/quasar_bench")))


def fsync_dir(path: Path) -> None:
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


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(binary file object) on a temp file beside `path`, fsync, then replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), suffix=path.suffix, dir=path.parent)
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
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str))


def json_cell(v):
    """A table cell as a CSV file keeps it: list-, array- and dict-valued cells (per-step acceptance,
    token ids, the acceptance curve, throughput per repeat) as JSON, whole (numpy's print form would
    elide long ones); other values unchanged."""
    if isinstance(v, (list, tuple, dict)) or (hasattr(v, "tolist") and getattr(v, "ndim", 0) >= 1):
        return json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    return v


def read_json(path):
    """The parsed JSON at `path`, or None when it is missing or torn (callers rebuild it)."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return None
