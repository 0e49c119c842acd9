"""Verifier precisions: each one a transform of a loaded model's runtime into a new runtime.

    build_verifier(loaded, vcfg, cache_dir) -> runtime      (vcfg: conf/verifier/NAME.yaml + overrides)
    verifier_names() -> sorted names

A precision is one `Precision` entry (name, parameter check, builder) in a module of this
package; the registry collects every module's `PRECISIONS`. Adding one is: the entry, its quantized
module class if it needs a new one (quant.py), conf/verifier/NAME.yaml, and its tests.

`loaded.runtime` is never mutated: a transform clones the module tree (sharing every unchanged
tensor) and replaces modules in the clone (quant.clone_runtime), or, for pruning, takes
runtime.with_layers(keep). Dropping the returned runtime frees what the transform added.

Built results of `cached` precisions are kept under cache_dir/verifiers/<model fingerprint>/ as
NAME-<key>.safetensors + .json, the key hashing the parameters and the source of the code that
quantizes (so a change to that code never reuses a stale entry). The saved state is generic:
every quantized module (its class name, info and buffers), every parameter the transform
replaced (e.g. SmoothQuant's folded norm weights) and the kept layers of a pruned model.
Embeddings and the final norm stay in the loaded model's precision in every verifier; so does
lm_head, unless a weight-only verifier is asked to quantize it too (`verifier.lm_head=true`).
After building, every quantized linear is pointed at the kernel backend `verifier.kernel`.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn

from ..errors import QuasarError, unknown
from ..fileio import atomic_write, read_json, write_json
from ..fingerprint import model_fingerprint, source_fingerprint
from ..quant import QUANT_MODULES, _QuantLinear, clone_runtime, fuse_projections, set_kernel

log = logging.getLogger(__name__)


@dataclass
class Precision:
    name: str
    build: Callable  # (loaded, vcfg, params, cache_dir) -> runtime
    params: Callable = field(default=lambda vcfg: {})  # validated parameters: also the cache key
    cached: bool = False  # save the built state and reload it next time
    is_reference: bool = False  # the precision fidelity is measured against
    native_only: bool = False  # needs the native runtime (else: also the generic transformers one)
    check: Callable | None = None  # (loaded, vcfg) -> why it cannot be built (its inputs), or None

    def unsupported(self, loaded, vcfg=None) -> str | None:
        """Why this precision cannot be built on `loaded` (checked before any long work), or None."""
        if self.native_only and not getattr(loaded.runtime, "is_native", False):
            return ("needs the native runtime (llama/qwen2/qwen3/mistral); this model runs on the generic "
                    "transformers path")
        if self.check is not None and vcfg is not None:
            return self.check(loaded, vcfg)
        return None


def _registry() -> dict[str, Precision]:
    out = {}
    for m in pkgutil.iter_modules(__path__):
        for p in getattr(importlib.import_module(f"{__name__}.{m.name}"), "PRECISIONS", []):
            out[p.name] = p
    return out


def verifier_names() -> list[str]:
    return sorted(_registry())


def precision(name: str) -> Precision:
    reg = _registry()
    if name not in reg:
        raise unknown("verifier", name, sorted(reg))
    return reg[name]


def code_version() -> str:
    from .. import calibration, gptq, packing, pruning, quant

    return source_fingerprint(packing, quant, calibration, calibration.CALIBRATION_FILE, gptq, pruning,
                              Path(__file__).parent)


# ------------------------------------------------------------------------------------------------
# parameter helpers shared by the entries
# ------------------------------------------------------------------------------------------------
def lm_head_param(vcfg) -> bool:
    """verifier.lm_head: quantize the LM head too (weight-only verifiers; RTN whatever the method)."""
    value = vcfg.lm_head
    if not isinstance(value, bool):
        raise QuasarError(f"verifier.lm_head={value!r}; choose true (quantize the LM head too) or false (keep it "
                          "in the model's precision)")
    return value


def check_bits(vcfg, bits: int) -> None:
    b = vcfg.get("bits", bits)
    if int(b) != bits:
        other = {4: "int4", 8: "int8 or w8a8"}.get(int(b), "int4, int8 or w8a8")
        raise QuasarError(f"verifier {vcfg.name} stores {bits}-bit weights, got bits={b}; the packed format holds "
                          f"4-bit (verifier=int4) or 8-bit (verifier=int8/w8a8) codes — use {other}")


def calibration_params(vcfg) -> dict:
    from ..calibration import CalibrationSpec

    return CalibrationSpec.from_cfg(vcfg).__dict__


# ------------------------------------------------------------------------------------------------
# on-disk cache of built verifiers
# ------------------------------------------------------------------------------------------------
class _Cache:
    def __init__(self, loaded, cache_dir: Path | None, name: str, params: dict):
        self.dir = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps({"code": code_version(), "name": name, **params}, sort_keys=True)
                                 .encode()).hexdigest()[:16]
            self.dir = Path(cache_dir) / "verifiers" / model_fingerprint(loaded)
            self.stem = f"{name}-{key}"
        self.name, self.params = name, params

    @property
    def meta_path(self):
        return self.dir / f"{self.stem}.json"

    @property
    def tensor_path(self):
        return self.dir / f"{self.stem}.safetensors"

    def load(self):
        meta = read_json(self.meta_path) if self.dir is not None else None
        if meta is None:
            return None
        tensors = {}
        if meta.get("has_tensors"):
            if not self.tensor_path.exists():
                return None
            from safetensors.torch import load_file

            tensors = load_file(str(self.tensor_path))
        return meta, tensors

    def save(self, meta: dict, tensors: dict) -> None:
        if self.dir is None:
            return
        meta = {"code": code_version(), "name": self.name, "params": self.params, **meta, "has_tensors": bool(tensors)}
        if tensors:
            from safetensors.torch import save

            data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            atomic_write(self.tensor_path, lambda f: f.write(data))
        write_json(self.meta_path, meta)  # json last: it marks the entry complete


def _resolve(root, path: str):
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _set(root, path: str, value) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, attr, value)


def state_of(runtime, source) -> tuple[dict, dict]:
    """(meta, tensors) of what `runtime` changed relative to `source`: quantized modules, replaced
    parameters (not shared with source), kept layers."""
    modules, tensors = {}, {}
    for path, mod in runtime.named_modules():
        if isinstance(mod, _QuantLinear):
            modules[path] = {"kind": type(mod).__name__, "info": mod.state_info()}
            for bname, b in mod.named_buffers(recurse=False):
                if b is not None:
                    tensors[f"{path}.{bname}"] = b
    src = dict(source.named_parameters())
    quant_paths = tuple(p + "." for p in modules)
    replaced = [name for name, p in runtime.named_parameters()
                if not name.startswith(quant_paths) and src.get(name) is not p]
    for name in replaced:
        tensors[name] = _resolve(runtime, name)
    return {"modules": modules, "replaced": replaced, "keep": getattr(runtime, "kept_layers", None)}, tensors


def runtime_from_state(loaded, meta: dict, tensors: dict):
    keep = meta.get("keep")
    new = loaded.runtime.with_layers(keep) if keep is not None else clone_runtime(loaded.runtime)
    if keep is not None:
        new.kept_layers = keep
    device, dtype = new.device, new.dtype
    for path, entry in meta["modules"].items():
        cls = QUANT_MODULES.get(entry["kind"])
        if cls is None:
            raise QuasarError(f"verifier cache entry names an unknown module kind {entry['kind']}; delete "
                              "<cache_dir>/verifiers and rebuild")
        prefix = path + "."
        buffers = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
        _set(new, path, cls.from_state(buffers, entry["info"]))
    for name in meta.get("replaced", []):
        _set(new, name, nn.Parameter(tensors[name].to(device=device, dtype=dtype), requires_grad=False))
    return new


# ------------------------------------------------------------------------------------------------
def build_verifier(loaded, vcfg, cache_dir: Path | None = None, fuse: bool = False):
    """A new runtime serving `loaded`'s model at the precision vcfg.name (loaded.runtime untouched),
    its quantized linears on kernel backend vcfg.kernel; with `fuse`, q/k/v and gate/up each run
    as one GEMM (quant.fuse_projections: same outputs, fewer launches and reads of x)."""
    from ..config import entry_config

    vcfg = entry_config("verifier", vcfg)
    entry = precision(vcfg.get("name"))
    params = entry.params(vcfg)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    runtime = None
    cache = _Cache(loaded, cache_dir, entry.name, params) if entry.cached else None
    if cache is not None:
        hit = cache.load()
        if hit is not None:
            log.info("verifier %s: loaded from cache %s", entry.name, cache.meta_path)
            runtime = runtime_from_state(loaded, *hit)
    if runtime is None:
        runtime = entry.build(loaded, vcfg, params, cache_dir)
        if cache is not None:
            cache.save(*state_of(runtime, loaded.runtime))
    kernel = vcfg.get("kernel") or "auto"
    ops = set_kernel(runtime, kernel)
    if kernel != "auto" and not ops:
        raise QuasarError(f"verifier.kernel={kernel} has no effect on verifier {entry.name}: it has no quantized "
                          "linears; drop verifier.kernel=")
    if ops:
        from ..backends import resolve

        for op in ops:  # refuse an unusable backend now, before any timing
            resolve(kernel, runtime.device.type, op)
    runtime.kernel_ops = ops
    if fuse and getattr(runtime, "is_native", False):
        runtime = fuse_projections(runtime)
    return runtime
