"""Pure-torch references for the kernels: the same math, dequantize then matmul in fp32.

Each `*_ref` function takes the same arguments as its kernel and returns [..., N] in x's dtype.
They are also the `reference` kernel backend (quasar_bench/backends/reference.py) and so the CPU
path of every quantized verifier: the function the kernel tests compare against is the one that
runs, not a copy. The building blocks take an already-dequantized (or transposed) weight so the
backend can compute it once per module instead of every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quasar_bench.packing import dequantize_int4, dequantize_int8

# Sums of int8 x int8 products stay exact in fp32 while |sum| < 2^24: 1024 products of at most
# 127^2 each reach 16.5e6 < 16.78e6. Longer dot products are split into chunks of this length.
EXACT_F32_CHUNK = 1024


def linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear(x, w, bias). On the CPU, for 2..64 rows, computed as (w @ x^T)^T: the same product,
    but MKL's small-M sgemm in the x @ w^T form is 1.1-3.6x slower here (2-core EPYC: SmolLM2's
    lm_head at 6 rows 46 ms vs 17 ms; every verify step of the CPU default runs 2..8 rows). Equal to
    F.linear up to summation order (bitwise at 1 row, where F.linear is kept)."""
    if x.device.type == "cpu" and x.dim() == 2 and 1 < x.shape[0] <= 64:
        out = (w @ x.t()).t().contiguous()
        return out + bias if bias is not None else out
    return F.linear(x, w, bias)


def linear_dequantized(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ w^T (+ bias) in fp32 with a float weight [N, K], cast back to x's dtype."""
    b = None if bias is None else bias.float()
    return linear(x.float(), w.float(), b).to(x.dtype)


def w4a16_linear_ref(x, qweight, scales, zeros, in_features: int, group_size: int, bias=None):
    w = dequantize_int4(qweight, scales, zeros, in_features, group_size, dtype=torch.float32)
    return linear_dequantized(x, w, bias)


def w8a16_linear_ref(x, qweight, scales, bias=None):
    return linear_dequantized(x, dequantize_int8(qweight, scales, dtype=torch.float32), bias)


def quantize_per_token_ref(x: torch.Tensor):
    """(x_int8, x_scales fp32): scale = absmax/127 per row (floored at 1e-10), round half away from 0."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 127.0).clamp(min=1e-10)
    v = xf / scale[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul_exact(xq: torch.Tensor, wq_t: torch.Tensor) -> torch.Tensor:
    """Exact integer sums of int8 products, float64 [M, N]: xq int8 [M, K] times wq_t [K, N] (int8
    codes, any float or int dtype). fp32 matmuls over K-chunks short enough to stay exact, chunk
    sums in float64: the same integers as int32 accumulation, for any M and on any device."""
    a = xq.float()
    b = wq_t.float()
    k = a.shape[-1]
    acc = None
    for s in range(0, k, EXACT_F32_CHUNK):
        part = (a[:, s : s + EXACT_F32_CHUNK] @ b[s : s + EXACT_F32_CHUNK]).double()
        acc = part if acc is None else acc + part
    return acc


def w8a8_from_codes(x: torch.Tensor, wq_t: torch.Tensor, scales, bias=None) -> torch.Tensor:
    """W8A8 with the weight codes given transposed [K, N]: per-token int8 activations, exact
    integer products, then the two scales."""
    q, xs = quantize_per_token_ref(x)
    acc = int8_matmul_exact(q.reshape(-1, x.shape[-1]), wq_t)
    y = (acc * scales.double()[None, :]).float().reshape(*x.shape[:-1], -1) * xs[..., None]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a8_linear_ref(x, qweight, scales, bias=None):
    return w8a8_from_codes(x, qweight.t(), scales, bias)
