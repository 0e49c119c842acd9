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
AUTO (below) whose kernel is built for the input's row count M (`Backend.min_rows` / `max_rows`):
on Hopper the wgmma kernel takes 9 to 192 rows (beyond 192 nothing is measured), our mma.sync CUDA
kernel the rest up to 16 (it computes one 16-row tile per weight pass, so past 16 rows it re-reads the
weights per tile), Triton everything larger; without the wgmma kernel the CUDA kernel keeps 1 to 16.
An explicit `verifier.kernel=` always uses the named backend, at every M. A backend kept outside the package is named by its module: `verifier.kernel=
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
AUTO = {"cuda": ("cuda_wgmma", "cuda", "triton", "reference"), "cpu": ("reference",)}
_REGISTERED: dict[str, "Backend"] = {}


class Backend:
    name = "base"
    devices: tuple[str, ...] = ("cuda",)
    # the fewest / most activation rows (M = tokens in the forward) `auto` gives this backend; None: any
    min_rows: int | None = None
    max_rows: int | None = None

    @property
    def label(self) -> str:
        """What rows record as this backend: its name, plus anything about its build that changes the
        numbers it gives (a kernel built a non-default way)."""
        return self.name

    def takes(self, rows: int) -> bool:
        """Whether `auto` gives this backend an input of `rows` activation rows."""
        return (self.min_rows is None or rows >= self.min_rows) and (self.max_rows is None or rows <= self.max_rows)

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


def _pick(found: list[Backend], rows: int) -> Backend:
    """auto's choice among the available candidates (in AUTO order) for `rows` activation rows."""
    return next((b for b in found if b.takes(rows)), found[-1])


def resolve(name: str, device_type: str, op: str, rows: int | None = None) -> Backend:
    """The backend that runs `op` on `device_type` for verifier.kernel=name, for an input of `rows`
    activation rows (None: the smallest); QuasarError if none."""
    if name in (None, "auto"):
        return _pick(_auto_candidates(device_type, op), 1 if rows is None else rows)
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
    """What rows record as the kernel of `op`: the backend's name, or for `auto` the backend per range
    of M in increasing M, e.g. `cuda(M<=8)>cuda_wgmma(M<=192)>triton` (the CUDA kernel up to 8 rows,
    the wgmma kernel 9 to 192, Triton above)."""
    if name not in (None, "auto"):
        return get_backend(name).label
    found = _auto_candidates(device_type, op)
    # the choice changes only where some backend's range starts or ends
    cuts = sorted({b.max_rows for b in found if b.max_rows is not None}
                  | {b.min_rows - 1 for b in found if b.min_rows is not None and b.min_rows > 1})
    parts: list[tuple[str, int | None]] = []
    for lo, hi in zip([1] + [c + 1 for c in cuts], cuts + [None]):
        b = _pick(found, lo)
        if parts and parts[-1][0] == b.label:
            parts[-1] = (b.label, hi)
        else:
            parts.append((b.label, hi))
    return ">".join(n if hi is None else f"{n}(M<={hi})" for n, hi in parts)
