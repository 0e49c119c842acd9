"""W4A16 verify GEMM: y[M, N] = x[M, K] @ W^T with W packed int4 (quasar_bench/packing.py format).

    qweight int32 [Kp//8, N]   nibble j of qweight[i, n] = code of W[n, 8i + j]
    scales, zeros float16 [Kp//G, N]      W[n, k] = (code - zero) * scale

The verify pass has M = k + 1 = 1..64 rows: the GEMM is memory-bound and its time is the time to
stream the packed weight once. With few rows, a grid over N alone leaves most SMs idle for the
small projections (k/v: 1024 columns), so the K loop is split across programs (split-K): each
program writes an fp32 partial [M, N]; the last split to arrive at an output tile (an atomic
counter) sums the partials in split order (deterministic), adds the bias and casts. A split of 1
writes the output directly. The dequantization avoids int->float conversions (see MAGIC_F32_BITS).

The split-K epilogue, configs and the autotuner shared with the int8 kernels are in splitk.py.

On CUDA, call these under CUDA graphs in a decode loop: an eager call costs 70-130 µs of Python
and launch time on the H100 machine here, more than the kernel. Warm up (one eager call per
shape and M bucket, which autotunes) before capturing; quasar_kernels/NOTES.md has the measurements.

CPU tensors run through Triton's interpreter: set TRITON_INTERPRET=1 before triton is first
imported (tests/test_kernels.py does, or reruns itself in a subprocess).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .splitk import (_epilogue, _tile, as_2d, check_device, dot_precision, large_m_candidates, launch_splitk, m_bucket,
                     pick_config, tile_candidates, with_defaults)


# --------------------------------------------------------------------------------------------
# W4A16
# --------------------------------------------------------------------------------------------


# 0x4B000000 is the fp32 bit pattern of 2^23: OR-ing a code 0..255 into the low mantissa bits
# gives the float 2^23 + code, and subtracting 2^23 (+ zero) is exact. This replaces the
# int->float conversion, which runs at a quarter of the fp32 rate on Hopper and bounded the
# first version of this kernel (~1.5 TB/s at best).
MAGIC_F32_BITS = tl.constexpr(0x4B000000)
MAGIC_F32 = tl.constexpr(8388608.0)

FMA_SLICES, DOT_SLICES, DOT_RESHAPE, DOT_SWAPPED = 0, 1, 2, 3  # MODE


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K_SPLIT, n_split,  # K_SPLIT: the K range one split covers (a multiple of BLOCK_K)
    K, Kp, stride_xm,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over one K split.

    A packed tile q [BLOCK_K // 8, BLOCK_N] holds 8 slices: slice j = nibble j of every row =
    the weight rows k = 8i + j. MODE:
      0 FMA_SLICES  each slice dequantized and FMA'd with the strided activation columns
                    x[:, 8i + j] into a [BLOCK_M, BLOCK_K // 8, BLOCK_N] fp32 accumulator that
                    is summed once at the end (GEMV style, M <= 4)
      1 DOT_SLICES  the same slices through tl.dot (K = BLOCK_K // 8 >= 16 per dot)
      2 DOT_RESHAPE the 8 slices reshaped to the natural [BLOCK_K, BLOCK_N] order and one
                    tl.dot with a contiguous activation tile (larger M: strided x loads cost
                    BLOCK_M x BLOCK_K scattered loads per tile in modes 0/1)
      3 DOT_SWAPPED _w4a16_swapped_kernel below (batched verification, M > 16)
    """
    BLOCK_P: tl.constexpr = BLOCK_K // 8
    offs_m, offs_n, mask_m, mask_n, k_begin = _tile(M, N, K_SPLIT, BLOCK_M, BLOCK_N)

    if MODE == 0:
        acc3 = tl.zeros([BLOCK_M, BLOCK_P, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_end = tl.minimum(k_begin + K_SPLIT, Kp)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_p = k0 // 8 + tl.arange(0, BLOCK_P)  # packed rows
        q = tl.load(qw_ptr + offs_p[:, None] * N + offs_n[None, :],
                    mask=(offs_p[:, None] < Kp // 8) & mask_n[None, :], other=0)
        # the 8 nibbles of a packed row share one group (G is a multiple of 8)
        if G % BLOCK_K == 0:
            g = k0 // G
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            g = (offs_p * 8) // G
            gmask = (offs_p[:, None] < Kp // 8) & mask_n[None, :]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
        zm = z + MAGIC_F32  # (2^23 + code) - (2^23 + zero) = code - zero, exactly
        if MODE == 2:
            shifts = tl.arange(0, 8) * 4
            bits = ((q[:, None, :] >> shifts[None, :, None]) & 0xF) | MAGIC_F32_BITS
            f = bits.to(tl.float32, bitcast=True)  # [BLOCK_P, 8, BLOCK_N]
            w = (f - zm[:, None, :]) * s[:, None, :]
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))  # row 8i + j = nibble j of packed row i
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            w = w.to(x.dtype)
            if PRECISION == "upcast":  # interpreter only, see dot_precision
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w, input_precision=PRECISION)
        else:
            for j in tl.static_range(8):
                offs_k = offs_p * 8 + j
                # activations x[:, 8i + j]: [BLOCK_M, BLOCK_P]; past the true K (padded group) read as 0
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
                bits = ((q >> (4 * j)) & 0xF) | MAGIC_F32_BITS
                w = (bits.to(tl.float32, bitcast=True) - zm) * s  # (code - zero) * scale
                if MODE == 0:
                    acc3 += x.to(tl.float32)[:, :, None] * w[None, :, :]
                else:
                    w = w.to(x.dtype)
                    if PRECISION == "upcast":
                        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(x, w, input_precision=PRECISION)
    if MODE == 0:
        acc = tl.sum(acc3, axis=1)

    _epilogue(acc, offs_m, offs_n, M, N, n_split, bias_ptr, out_ptr, part_ptr, cnt_ptr, HAS_BIAS, SPLIT_MODE)


@triton.jit
def _w4a16_swapped_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K_SPLIT, n_split,
    K, Kp, stride_xm,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """MODE 3, for many rows (batched verification): the transposed product
    acc^T [BLOCK_N, BLOCK_M] += W [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M].

    Why swapped: Hopper's wgmma reads its first operand from registers and only its second from
    shared memory. With x @ W^T (mode 2) the freshly dequantized weights are the second operand and
    make a round trip through shared memory every K step; here they stay in registers and x^T,
    which the pipeliner stages in shared memory anyway, is the second. The weight rows fill the
    MMA's 64-row side, the tokens its N side (8..256), so BLOCK_M can be as small as 16.
    """
    BLOCK_P: tl.constexpr = BLOCK_K // 8
    offs_m, offs_n, mask_m, mask_n, k_begin = _tile(M, N, K_SPLIT, BLOCK_M, BLOCK_N)
    shifts = tl.arange(0, 8) * 4
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_end = tl.minimum(k_begin + K_SPLIT, Kp)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_p = k0 // 8 + tl.arange(0, BLOCK_P)
        q = tl.load(qw_ptr + offs_p[None, :] * N + offs_n[:, None],  # [BLOCK_N, BLOCK_P], N contiguous
                    mask=(offs_p[None, :] < Kp // 8) & mask_n[:, None], other=0)
        if G % BLOCK_K == 0:  # one group per K step: a scale per weight row
            g = k0 // G
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        else:
            g = (offs_p * 8) // G
            gmask = (offs_p[None, :] < Kp // 8) & mask_n[:, None]
            s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=gmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=gmask, other=0.0).to(tl.float32)
        zm = z + MAGIC_F32
        bits = ((q[:, :, None] >> shifts[None, None, :]) & 0xF) | MAGIC_F32_BITS
        w = (bits.to(tl.float32, bitcast=True) - zm[:, :, None]) * s[:, :, None]  # [BLOCK_N, BLOCK_P, 8]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))  # column 8i + j = nibble j of packed row i
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],  # x^T [BLOCK_K, BLOCK_M]
                     mask=mask_m[None, :] & (offs_k[:, None] < K), other=0.0)
        w = w.to(xt.dtype)
        if PRECISION == "upcast":  # interpreter only, see dot_precision
            acc_t += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc_t += tl.dot(w, xt, input_precision=PRECISION)
    _epilogue(tl.trans(acc_t), offs_m, offs_n, M, N, n_split, bias_ptr, out_ptr, part_ptr, cnt_ptr, HAS_BIAS,
              SPLIT_MODE)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per MODE: the default, then what the autotuner tries.
# BLOCK_K >= 128 in the slice modes: each of the 8 slices feeds tl.dot a K of BLOCK_K // 8 >= 16.
_W4_TILES = {
    FMA_SLICES: [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3)],
    DOT_SLICES: [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3)],
    DOT_RESHAPE: [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)],
    # BLOCK_N here is the wgmma's 64-row side (64 rows per warpgroup of num_warps // 4)
    DOT_SWAPPED: [(128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 4), (256, 64, 8, 3)],
}


def swapped_block_m(m: int) -> int:
    """Tokens per program in mode 3: all of them up to 256 (the MMA's N side), so each weight tile is
    dequantized once per forward; a power of two for tl.arange."""
    return min(256, max(16, 1 << (m - 1).bit_length()))


def swapped_candidates(x, n, k_total) -> list[dict]:
    """Mode-3 configs, the first tile unsplit first: what w4a16_linear(mode=3) tunes over. The
    autotuner of the default path does not try them: on the H200 mode 3 was slower than mode 2 at
    every M from 16 to 192 (0.47x vs 0.80x cuBLAS for gate+up at M = 64; results/gpu/
    w4a16_large_m_notes.md), and each is a compile on first use."""
    m = x.shape[0]
    bm = swapped_block_m(m)
    # a 256 x 256 fp32 accumulator would take all 255 registers of 256 threads
    tiles = [t for t in _W4_TILES[DOT_SWAPPED] if t[0] * bm <= 128 * 256]
    timed = tile_candidates(x, n, k_total, tiles, None, block_m=bm, extra=dict(MODE=DOT_SWAPPED), waves=(0, 1))
    bn, bk, warps, stages = tiles[0]  # without timing (CPU, capture, tuning off): the first tile, unsplit
    return timed or [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, num_warps=warps, num_stages=stages,
                          MODE=DOT_SWAPPED)]


def _w4_default_mode(m: int) -> int:
    return DOT_SLICES if m <= 16 else DOT_RESHAPE


def tune_name(mode: int | None = None) -> str:
    """The autotuner's kernel name for w4a16_linear(mode=...): modes restricted by `mode` tune apart."""
    return "w4a16" if mode is None else f"w4a16_mode{mode}"


def w4a16_linear(x, qweight, scales, zeros, in_features: int, group_size: int, bias=None, *, config=None,
                 mode: int | None = None):
    """y = x @ dequantize_int4(qweight, scales, zeros)^T (+ bias), in x's dtype.

    x [..., K] (bf16/fp16/fp32, K = in_features); qweight int32 [Kp//8, N]; scales/zeros fp16
    [Kp//G, N]. `config` (dict of BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) overrides the
    tuned choice (tests and benchmarks); `mode` (2 or 3) tunes among that MODE's configs only
    (benchmarks comparing the modes; tuned under its own key).
    """
    check_device(x)
    x2, lead = as_2d(x)
    k = in_features
    if x2.shape[1] != k:
        raise ValueError(f"x has {x2.shape[1]} input features, the weight {k}")
    kp8, n = qweight.shape
    kp = kp8 * 8
    if kp % group_size or scales.shape != (kp // group_size, n) or zeros.shape != scales.shape:
        raise ValueError("qweight/scales/zeros do not match the packing.py int4 format")
    if qweight.dtype != torch.int32 or not qweight.is_contiguous():
        raise ValueError("qweight must be a contiguous int32 tensor [Kp//8, N]")

    def launch(cfg):
        kernel = _w4a16_swapped_kernel if cfg["MODE"] == DOT_SWAPPED else _w4a16_kernel
        return launch_splitk(kernel, x2, n, bias, cfg, kp,
                             (x2, qweight, scales, zeros), K=k, Kp=kp, stride_xm=x2.stride(0),
                             G=group_size, PRECISION=dot_precision(x2.dtype), MODE=cfg["MODE"])

    def candidates():
        m = x2.shape[0]
        if mode == DOT_SWAPPED:
            return swapped_candidates(x2, n, kp)
        if mode == DOT_RESHAPE:
            return tile_candidates(x2, n, kp, _W4_TILES[DOT_RESHAPE], _W4_TILES[DOT_RESHAPE][1],
                                   extra=dict(MODE=DOT_RESHAPE)) + large_m_candidates(x2, n, kp, extra=dict(MODE=2))
        dm = _w4_default_mode(m)
        tiles = _W4_TILES[dm]
        cands = tile_candidates(x2, n, kp, tiles, tiles[1], extra=dict(MODE=dm))
        other = DOT_RESHAPE if dm == DOT_SLICES else DOT_SLICES
        cands += tile_candidates(x2, n, kp, _W4_TILES[other][1:3], None, extra=dict(MODE=other))
        if m <= 4:
            cands += tile_candidates(x2, n, kp, _W4_TILES[FMA_SLICES], None, block_m=m_bucket(m),
                                     extra=dict(MODE=FMA_SLICES))
        cands += large_m_candidates(x2, n, kp, extra=dict(MODE=DOT_RESHAPE))
        return cands

    if mode not in (None, DOT_RESHAPE, DOT_SWAPPED):
        raise ValueError(f"w4a16_linear: mode must be None, {DOT_RESHAPE} or {DOT_SWAPPED}, got {mode!r}")
    if config is None:
        config = pick_config(tune_name(mode), x2, n, k, candidates, launch)
    else:
        config = {"MODE": _w4_default_mode(x2.shape[0]), **config}
        config = with_defaults(config, x2.shape[0])
    return launch(config).reshape(*lead, n)
