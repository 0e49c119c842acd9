"""The attention prologue in one kernel: split the fused q/k/v projection output, RMS-normalise q
and k per head (Qwen3's q_norm / k_norm, when given), rotate them (RoPE, rotate-half convention),
write k and v into the static KV cache at their positions, and return q laid out [heads, T, D]
for attention. Unfused this is six to eight kernels per layer (two norms, two RoPE, two cache
writes, transposes); on a decode step each is a ~2 µs launch for a few KB of data.

    qkv_rope_cache(qkv, q_norm_w, k_norm_w, eps, cos, sin, k_cache, v_cache, pos) -> q [Hq, T, D]

qkv [T, (Hq + 2 Hkv) * D]; cos/sin [T, D]; k_cache/v_cache [Hkv, S, D] (written in place);
pos [T] int64 positions. The reference is the runtime's unfused path (runtime.rms_norm, rope).
Numerics: fp32 inside, the norm's output rounded to the model dtype before its weight, as
transformers does; one rounding at the end (the unfused bf16 path rounds after every op).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qkv_rope_cache_kernel(qkv, q_out, k_cache, v_cache, q_w, k_w, cos, sin, pos, eps,
                           s_qkv, s_qh, s_qt, s_ch, s_cs, s_cos,
                           HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    half = tl.arange(0, D // 2)
    src = qkv + t * s_qkv + h * D
    x1 = tl.load(src + half).to(tl.float32)
    x2 = tl.load(src + D // 2 + half).to(tl.float32)
    p = tl.load(pos + t)
    dtype = q_out.dtype.element_ty
    if h < HQ + HKV:  # q or k: norm, then RoPE
        if HAS_NORM:
            rstd = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D + eps)
            if h < HQ:
                w1 = tl.load(q_w + half).to(tl.float32)
                w2 = tl.load(q_w + D // 2 + half).to(tl.float32)
            else:
                w1 = tl.load(k_w + half).to(tl.float32)
                w2 = tl.load(k_w + D // 2 + half).to(tl.float32)
            x1 = (x1 * rstd).to(dtype).to(tl.float32) * w1
            x2 = (x2 * rstd).to(dtype).to(tl.float32) * w2
        c1 = tl.load(cos + t * s_cos + half).to(tl.float32)
        c2 = tl.load(cos + t * s_cos + D // 2 + half).to(tl.float32)
        n1 = tl.load(sin + t * s_cos + half).to(tl.float32)
        n2 = tl.load(sin + t * s_cos + D // 2 + half).to(tl.float32)
        y1 = x1 * c1 - x2 * n1
        y2 = x2 * c2 + x1 * n2
        if h < HQ:
            dst = q_out + h * s_qh + t * s_qt
        else:
            dst = k_cache + (h - HQ) * s_ch + p * s_cs
        tl.store(dst + half, y1.to(dtype))
        tl.store(dst + D // 2 + half, y2.to(dtype))
    else:  # v: copied into the cache as it is
        dst = v_cache + (h - HQ - HKV) * s_ch + p * s_cs
        tl.store(dst + half, x1.to(dtype))
        tl.store(dst + D // 2 + half, x2.to(dtype))


def qkv_rope_cache(qkv: torch.Tensor, q_norm_w, k_norm_w, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    t = qkv.shape[0]
    hkv, _, d = k_cache.shape
    hq = qkv.shape[1] // d - 2 * hkv
    if qkv.stride(1) != 1 or k_cache.stride(2) != 1 or v_cache.stride() != k_cache.stride() or cos.stride(1) != 1:
        raise ValueError("qkv_rope_cache needs row-major qkv, cos/sin and caches")
    if d & (d - 1) or d < 16:
        raise ValueError(f"qkv_rope_cache needs a power-of-two head_dim >= 16, got {d}")
    q = torch.empty((hq, t, d), dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm_w is not None
    _qkv_rope_cache_kernel[(t, hq + 2 * hkv)](
        qkv, q, k_cache, v_cache, q_norm_w if has_norm else qkv, k_norm_w if has_norm else qkv, cos, sin, pos,
        float(eps), qkv.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), cos.stride(0),
        HQ=hq, HKV=hkv, D=d, HAS_NORM=has_norm, num_warps=1)
    return q
