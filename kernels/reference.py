"""Pure-torch references for the Triton kernels: the same math, dequantize then matmul in fp32.

Each function takes the same arguments as its kernel and returns [..., N] in x's dtype.
"""
from __future__ import annotations

import torch

from quasar_bench.packing import dequantize_int4, dequantize_int8


def _finish(y: torch.Tensor, bias, dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def w4a16_linear_ref(x, qweight, scales, zeros, in_features: int, group_size: int, bias=None):
    w = dequantize_int4(qweight, scales, zeros, in_features, group_size, dtype=torch.float32)
    return _finish(x.float() @ w.t(), bias, x.dtype)


def w8a16_linear_ref(x, qweight, scales, bias=None):
    w = dequantize_int8(qweight, scales, dtype=torch.float32)
    return _finish(x.float() @ w.t(), bias, x.dtype)


def quantize_per_token_ref(x: torch.Tensor):
    """(x_int8, x_scales fp32): scale = absmax/127 per row (floored at 1e-10), round half away from 0."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 127.0).clamp(min=1e-10)
    v = xf / scale[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).to(torch.int8)
    return q, scale


def w8a8_linear_ref(x, qweight, scales, bias=None):
    q, xs = quantize_per_token_ref(x)
    # int8 x int8 sums reach K * 127^2 > 2^24: accumulate in float64, exact like int32
    acc = q.double() @ qweight.double().t()
    y = acc.float() * xs[..., None] * scales.float()
    return _finish(y, bias, x.dtype)
