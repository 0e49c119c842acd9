"""W8A16 verify GEMM: y[M, N] = x[M, K] @ (qweight * scales[:, None])^T, int8 weights per channel.

    qweight int8 [N, K] (nn.Linear layout), scales float16 [N]       (quasar_bench/packing.py)

The int8 codes convert exactly to bf16/fp16, so the tile goes straight into tl.dot and the
per-channel scale is applied once to the fp32 accumulator. Same split-K scheme as w4a16.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .splitk import (_epilogue, _tile, as_2d, check_device, dot_precision, large_m_candidates, launch_splitk,
                     pick_config, tile_candidates, with_defaults)


@triton.jit
def _w8a16_kernel(
    x_ptr, qw_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K_SPLIT, n_split,
    K, stride_xm,
    HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, k_begin = _tile(M, N, K_SPLIT, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # weight tile [BLOCK_K, BLOCK_N] read from the [N, K] layout (contiguous along k)
        q = tl.load(qw_ptr + offs_n[None, :] * K + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        # int8 -> float without the quarter-rate int->float conversion: the bits of 2^23 + 128 + q
        # are 0x4B000080 + q, so (bits as fp32) - (2^23 + 128) = q exactly (see w4a16.MAGIC_F32_BITS)
        w = ((q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0).to(x.dtype)
        if PRECISION == "upcast":  # interpreter only, see dot_precision
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w, input_precision=PRECISION)

    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    _epilogue(acc, offs_m, offs_n, M, N, n_split, bias_ptr, out_ptr, part_ptr, cnt_ptr, HAS_BIAS, SPLIT_MODE)


_W8_DEFAULT = (64, 128, 4, 4)
_W8_TILES = [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4)]


def w8a16_linear(x, qweight, scales, bias=None, *, config=None):
    """y = x @ (qweight.float() * scales[:, None])^T (+ bias), in x's dtype.

    x [..., K] bf16/fp16/fp32; qweight int8 [N, K]; scales fp16 [N].
    """
    check_device(x)
    x2, lead = as_2d(x)
    n, k = qweight.shape
    if x2.shape[1] != k:
        raise ValueError(f"x has {x2.shape[1]} input features, the weight {k}")
    if qweight.dtype != torch.int8 or not qweight.is_contiguous() or scales.shape != (n,):
        raise ValueError("qweight must be contiguous int8 [N, K] with scales [N] (packing.py int8 format)")

    def launch(cfg):
        return launch_splitk(_w8a16_kernel, x2, n, bias, cfg, k, (x2, qweight, scales),
                             K=k, stride_xm=x2.stride(0), PRECISION=dot_precision(x2.dtype))

    if config is None:
        config = pick_config("w8a16", x2, n, k, lambda: tile_candidates(x2, n, k, _W8_TILES, _W8_DEFAULT)
                             + large_m_candidates(x2, n, k), launch)
    else:
        config = with_defaults(config, x2.shape[0])
    return launch(config).reshape(*lead, n)
