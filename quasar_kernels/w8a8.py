"""W8A8 verify GEMM: int8 weights per channel x int8 activations per token (dynamic).

    x_int8, x_scale = quantize_per_token(x)      x_scale[m] = max_k |x[m, k]| / 127 (fp32)
                                                 x_int8 = round_half_away(x / x_scale), in -127..127
    y[m, n] = x_scale[m] * scales[n] * sum_k x_int8[m, k] * qweight[n, k]     (int32 accumulation)

Two GEMM backends: "triton" (tl.dot on int8 operands, int32 accumulator, split-K like the other
kernels) and "int_mm" (torch._int_mm, cuBLASLt int8; needs M > 16, so M is padded to 32, and
the rescale runs as separate torch ops). backend="auto" times both per (M bucket, N, K) on
CUDA, together with the Triton configs, and keeps the fastest.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .splitk import (_epilogue, _tile, as_2d, check_device, large_m_candidates, launch_splitk, pick_config,
                     tile_candidates, tuned_config, with_defaults)


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """One program per row: absmax over K, then q = round_half_away(x * 127 / absmax)."""
    row = tl.program_id(0)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / 127.0, 1e-10)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32) / scale
        r = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, r.to(tl.int8), mask=offs < K)


def quantize_per_token(x: torch.Tensor):
    """x [..., K] float -> (x_int8 [..., K] int8, x_scales [...] float32), scale = absmax / 127."""
    check_device(x)
    x2, lead = as_2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    block = min(4096, triton.next_power_of_2(k))
    if m:
        _quantize_per_token_kernel[(m,)](x2, q, s, k, x2.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return q.reshape(*lead, k), s.reshape(lead)


@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, qw_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K_SPLIT, n_split,
    K,
    HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, k_begin = _tile(M, N, K_SPLIT, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(qw_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)

    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    _epilogue(y, offs_m, offs_n, M, N, n_split, bias_ptr, out_ptr, part_ptr, cnt_ptr, HAS_BIAS, SPLIT_MODE)


_W8A8_DEFAULT = (64, 128, 4, 4)
_W8A8_TILES = [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4)]
_INT_MM = {"backend": "int_mm"}


def _int_mm_gemm(xq, xs, qweight, scales, bias, out_dtype):
    """torch._int_mm path: cuBLASLt int8 x int8 -> int32, then the rescale in torch."""
    m = xq.shape[0]
    mp = max(32, -(-m // 8) * 8)  # _int_mm needs more than 16 rows
    if mp != m:
        xq = torch.cat([xq, xq.new_zeros((mp - m, xq.shape[1]))])
    acc = torch._int_mm(xq, qweight.t())[:m]
    y = acc.float() * xs[:, None] * scales.float()[None, :]
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)


def w8a8_linear(x, qweight, scales, bias=None, *, backend: str = "auto", config=None):
    """y = per-token-int8(x) @ qweight^T, rescaled by x_scale[m] * scales[n] (+ bias), in x's dtype.

    x [..., K] bf16/fp16/fp32; qweight int8 [N, K]; scales fp16 [N].
    backend: "auto" (fastest measured on CUDA; Triton elsewhere), "triton" or "int_mm" (CUDA only).
    """
    check_device(x)
    x2, lead = as_2d(x)
    n, k = qweight.shape
    if x2.shape[1] != k:
        raise ValueError(f"x has {x2.shape[1]} input features, the weight {k}")
    if qweight.dtype != torch.int8 or not qweight.is_contiguous() or scales.shape != (n,):
        raise ValueError("qweight must be contiguous int8 [N, K] with scales [N] (packing.py int8 format)")
    if backend not in ("auto", "triton", "int_mm"):
        raise ValueError(f"backend must be auto, triton or int_mm, got {backend!r}")

    def launch(cfg):
        xq, xs = quantize_per_token(x2)
        if cfg.get("backend") == "int_mm":
            return _int_mm_gemm(xq, xs, qweight, scales, bias, x2.dtype)
        return launch_splitk(_w8a8_kernel, x2, n, bias, cfg, k, (xq, xs, qweight, scales), K=k)

    if backend == "int_mm":
        config = _INT_MM
    elif config is None:
        def candidates():
            cands = tile_candidates(x2, n, k, _W8A8_TILES, _W8A8_DEFAULT)
            cands += large_m_candidates(x2, n, k)
            if backend == "auto" and x2.is_cuda and k % 8 == 0 and n % 8 == 0:
                cands.append(_INT_MM)
            return cands

        config = pick_config(f"w8a8-{backend}", x2, n, k, candidates, launch)
    else:
        config = with_defaults(config, x2.shape[0])
    return launch(config).reshape(*lead, n)


def chosen_backend(m: int, n: int, k: int, dtype=torch.bfloat16) -> str | None:
    """Which backend backend="auto" picked for this shape (None if not tuned yet)."""
    cfg = tuned_config("w8a8-auto", m, n, k, dtype)
    return None if cfg is None else cfg.get("backend", "triton")
