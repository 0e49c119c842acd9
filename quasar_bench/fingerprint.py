"""Identities of weights and code, for cache keys and result rows."""
from __future__ import annotations

import hashlib
from pathlib import Path


def weights_fingerprint(runtime) -> str:
    """Identity of a runtime's weights: names, shapes, dtypes and a strided sample of every tensor
    (KV caches excluded). Two runtimes that differ in any quantized or pruned tensor differ here."""
    module = getattr(runtime, "model", runtime)
    h = hashlib.sha256()
    h.update(repr(getattr(runtime, "args", None)).encode())
    unused = runtime.unused_tensors() if hasattr(runtime, "unused_tensors") else set()  # generic: pruned layers
    for name, t in sorted(module.state_dict(keep_vars=bool(unused)).items()):
        if "cache" in name or id(t) in unused:
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() and flat.device.type != "meta":
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def slug(s) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))[:40]


def model_fingerprint(loaded) -> str:
    """`<model name>-<weights fingerprint>`: the directory name of a model's caches."""
    return f"{slug(loaded.name)}-{weights_fingerprint(loaded.runtime)}"


def code_fingerprint() -> str:
    """The source of the package and its kernels: results of other code are other cells."""
    import quasar_kernels

    from . import __file__ as pkg

    return source_fingerprint(Path(pkg).parent, Path(quasar_kernels.__file__).parent)


def prompts_fingerprint(prompts) -> str:
    """The evaluated prompts' ids, categories and text."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(repr((p.dataset, p.category, str(p.prompt_id), list(p.turns))).encode())
    return h.hexdigest()[:16]


def source_fingerprint(*modules) -> str:
    """Hash of the source files of `modules` (module objects or paths): a cache keyed on it is
    rebuilt whenever that code changes, so a stale cache is never reused."""
    h = hashlib.sha256()
    for m in modules:
        path = Path(m if isinstance(m, (str, Path)) else m.__file__)
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]
