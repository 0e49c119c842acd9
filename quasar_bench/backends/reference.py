"""The pure-torch reference backend: dequantize, then matmul in fp32 (quasar_kernels/reference.py).

It is the CPU path of every quantized verifier and the function every kernel is tested against.
On CPU the dequantized fp32 weight (or, for W8A8, the transposed codes as fp32) is computed once
per module and kept: the same function, evaluated once instead of every call. On CUDA it is
recomputed per call (a correctness path, not a fast one: a float copy of every weight would not fit).
"""
from __future__ import annotations

from quasar_kernels.reference import exact_chunks, linear_dequantized, w8a8_from_codes

from . import Backend


class Reference(Backend):
    name = "reference"
    devices = ("cpu", "cuda")

    def _weight(self, mod, make):
        return self.prepared(mod, make) if mod.qweight.device.type == "cpu" else make()

    def w4a16(self, mod, x):
        return linear_dequantized(x, self._weight(mod, lambda: mod.dequantize().float()), mod.bias)

    def w8a16(self, mod, x):
        return linear_dequantized(x, self._weight(mod, lambda: mod.dequantize().float()), mod.bias)

    def w8a8(self, mod, x):
        return w8a8_from_codes(x, self._weight(mod, lambda: exact_chunks(mod.qweight)), mod.scales, mod.bias)


BACKEND = Reference()
