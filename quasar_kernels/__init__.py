"""Triton verify-pass GEMMs for quantized verifiers (W4A16, W8A16, W8A8), each with a pure-torch
reference in quasar_kernels/reference.py. Weight formats: quasar_bench/packing.py.

CUDA tensors run compiled kernels (autotuned per (M bucket, N, K) on first use; run them under
CUDA graphs: see quasar_kernels/NOTES.md); CPU tensors run through Triton's interpreter, which needs
TRITON_INTERPRET=1 in the environment before triton is first imported.

    w4a16_linear(x, qweight, scales, zeros, in_features, group_size, bias=None, *, config=None)
    w8a16_linear(x, qweight, scales, bias=None, *, config=None)
    w8a8_linear(x, qweight, scales, bias=None, *, backend="auto", config=None)
    quantize_per_token(x) -> (x_int8, x_scales fp32)
"""
from .w4a16 import w4a16_linear
from .w8a16 import w8a16_linear
from .w8a8 import quantize_per_token, w8a8_linear

__all__ = ["w4a16_linear", "w8a16_linear", "w8a8_linear", "quantize_per_token"]
