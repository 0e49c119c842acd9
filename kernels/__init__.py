"""Triton verify-pass GEMMs for quantized verifiers (W4A16, W8A16, W8A8), each with a pure-torch
reference in kernels/reference.py. Weight formats: quasar_bench/packing.py.

CUDA tensors run compiled kernels; CPU tensors run through Triton's interpreter, which needs
TRITON_INTERPRET=1 in the environment before this package is imported.
"""
from .w4a16 import w4a16_linear
from .w8a16 import w8a16_linear
from .w8a8 import quantize_per_token, w8a8_linear

__all__ = ["w4a16_linear", "w8a16_linear", "w8a8_linear", "quantize_per_token"]
