"""Our Triton kernels (quasar_kernels/): W4A16, W8A16, W8A8, autotuned per shape on first use."""
from __future__ import annotations

from . import Backend

_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        import quasar_kernels  # noqa: PLC0415 (imports triton: only when a CUDA forward needs it)

        _KERNELS = quasar_kernels
    return _KERNELS


class Triton(Backend):
    name = "triton"

    def available(self):
        try:
            _kernels()
        except Exception as e:  # ImportError, triton missing, driver problems
            first = str(e).splitlines()[0][:120] if str(e) else ""
            return False, f"importing the Triton kernels failed ({type(e).__name__}: {first}); `pip install -e .[triton]`"
        return True, ""

    def w4a16(self, mod, x):
        return _kernels().w4a16_linear(x, mod.qweight, mod.scales, mod.zeros, mod.in_features, mod.group_size, mod.bias)

    def w8a16(self, mod, x):
        return _kernels().w8a16_linear(x, mod.qweight, mod.scales, mod.bias)

    def w8a8(self, mod, x):
        return _kernels().w8a8_linear(x, mod.qweight, mod.scales, mod.bias)


BACKEND = Triton()
