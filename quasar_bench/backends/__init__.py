"""Kernel backends: who computes a quantized linear. A verifier's quantized modules call the
backend named by `verifier.kernel` (default `auto`); the weights and their meaning never change
with the backend, only the kernel that reads them.

A backend is one module in this package exporting `BACKEND`, an instance of a `Backend` subclass
that implements the ops it supports (each takes the quantized module and the input):

    w4a16(mod, x)   Int4Linear: packed int4 weights, activations in the model dtype
    w8a16(mod, x)   Int8Linear: int8 weights per output channel
    w8a8(mod, x)    W8A8Linear: int8 weights x per-token int8 activations (x already smoothed)

Built in: `reference` (the pure-torch reference of quasar_kernels/reference.py: the CPU path, and the
function every kernel is tested against), `triton` (ours, quasar_kernels/), `torch` (torch's own int4
/ int8 weight-only kernels). `auto` picks, per device and op, the first available backend in
AUTO (below) whose kernel is built for the input's row count M (`Backend.max_rows`: our CUDA
W4A16 kernel computes one 16-row tile per weight pass, so at M > 16 it re-reads the weights per
tile and `auto` hands such inputs to the next backend, the Hopper wgmma kernel, which keeps up to
192 rows (as far as it is measured), then Triton; an explicit `verifier.kernel=` always uses the named backend, at every M). A backend kept outside the package is named by its module: `verifier.kernel=
my_pkg.my_backend` imports it and uses its BACKEND (or call register_backend()).
A backend that cannot run (missing package, no GPU, op not supported) is refused with one line
naming the reason: never a silent switch to another backend.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import QuasarError

OPS = ("w4a16", "w8a16", "w8a8")
# auto: per device type, the backends tried in order for each op (the first that supports it).
AUTO = {"cuda": ("cuda", "cuda_wgmma", "triton", "reference"), "cpu": ("reference",)}
_REGISTERED: dict[str, "Backend"] = {}


class Backend:
    name = "base"
    devices: tuple[str, ...] = ("cuda",)
    # the most activation rows (M = tokens in the forward) `auto` gives this backend; None: any
    max_rows: int | None = None

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, why not: one line naming the fix)."""
        return True, ""

    def supports(self, op: str) -> bool:
        return getattr(type(self), op, None) is not getattr(Backend, op, None)

    def prepared(self, mod, make):
        """Per-module state this backend derives from the packed weights (re-layouts), made once
        and kept on the module until it moves (`mod.prepared` is cleared by .to())."""
        store = mod.prepared
        if self.name not in store:
            store[self.name] = make()
        return store[self.name]

    def w4a16(self, mod, x):
        raise NotImplementedError

    def w8a16(self, mod, x):
        raise NotImplementedError

    def w8a8(self, mod, x):
        raise NotImplementedError


def register_backend(backend: Backend) -> Backend:
    _REGISTERED[backend.name] = backend
    return backend


def builtin_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def backend_names() -> list[str]:
    return sorted(set(builtin_names()) | set(_REGISTERED))


def get_backend(name: str) -> Backend:
    if name in _REGISTERED:
        return _REGISTERED[name]
    module_name = f"{__name__}.{name}" if name in builtin_names() else name
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise QuasarError(f"unknown verifier.kernel={name!r}; choose auto or one of {', '.join(backend_names())} "
                          "(or an importable module that defines BACKEND)") from None
    backend = getattr(module, "BACKEND", None)
    if not isinstance(backend, Backend):
        raise QuasarError(f"module {module_name} defines no BACKEND (a quasar_bench.backends.Backend instance)")
    return register_backend(backend)


def _auto_candidates(device_type: str, op: str) -> list[Backend]:
    found = []
    for candidate in AUTO.get(device_type, ("reference",)):
        b = get_backend(candidate)
        if b.supports(op) and device_type in b.devices and b.available()[0]:
            found.append(b)
    if not found:
        raise QuasarError(f"no kernel backend runs {op} on {device_type}")
    return found


def resolve(name: str, device_type: str, op: str, rows: int | None = None) -> Backend:
    """The backend that runs `op` on `device_type` for verifier.kernel=name, for an input of `rows`
    activation rows (None: the smallest); QuasarError if none."""
    if name in (None, "auto"):
        found = _auto_candidates(device_type, op)
        return next((b for b in found if b.max_rows is None or rows is None or rows <= b.max_rows), found[-1])
    b = get_backend(name)
    if device_type not in b.devices:
        raise QuasarError(f"verifier.kernel={name} runs on {', '.join(b.devices)}, not {device_type}; "
                          "use verifier.kernel=auto or move the model (model.device=)")
    if not b.supports(op):
        raise QuasarError(f"verifier.kernel={name} has no {op} kernel; use verifier.kernel=auto or another backend")
    ok, why = b.available()
    if not ok:
        raise QuasarError(f"verifier.kernel={name} is unavailable: {why}")
    return b


def describe(name: str, device_type: str, op: str) -> str:
    """What rows record as the kernel of `op`: the backend's name, or for `auto` the choice per M,
    e.g. `cuda(M<=16)>triton` (the CUDA kernel up to 16 rows, Triton above)."""
    if name not in (None, "auto"):
        return name
    parts = []
    for b in _auto_candidates(device_type, op):
        parts.append(b.name if b.max_rows is None else f"{b.name}(M<={b.max_rows})")
        if b.max_rows is None:
            break
    return ">".join(parts)
