"""Attention for decode and verify steps (T <= 16 new tokens) over the static KV cache, reading only
the filled part of the cache: the length comes from the positions tensor on the device, so one CUDA
graph serves every position (no span buckets, no mask tensor, nothing past the last token read).

    decode_attention(q [Hq, T, D], k_cache [Hkv, S, D], v_cache, pos [T] int64) -> out [T, Hq * D]

Query t sits at position pos[t] = pos[0] + t and sees keys 0..pos[t] (causal among the new tokens).
Grouped-query attention: the G = Hq / Hkv query heads of one KV head are stacked as G * T rows of
one tile, so each K/V block is read once per KV head. Flash-decoding: NSPLIT programs per KV head
each take a contiguous share of the key blocks (online softmax in fp32), and a second kernel
combines the shares; the output comes out as o_proj's input, [T, Hq * D].
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NSPLIT = 16  # key-range shares per KV head: 8 KV heads x 16 = 128 programs on a 132-SM H100
BLOCK_N = 64


@triton.jit
def _partial_kernel(q, k_cache, v_cache, pos, ws_acc, ws_ml, sm_scale_log2,
                    s_qh, s_qt, s_ch, s_cs,
                    T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NS: tl.constexpr,
                    BN: tl.constexpr, IEEE: tl.constexpr):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, R)
    dims = tl.arange(0, D)
    valid = rows < G * T
    t_row = rows % T
    head = kvh * G + rows // T
    qt = tl.load(q + head[:, None] * s_qh + t_row[:, None] * s_qt + dims[None, :], mask=valid[:, None], other=0.0)
    pos0 = tl.load(pos)
    n_keys = pos0 + T
    n_blocks = tl.cdiv(n_keys, BN)
    per_split = tl.cdiv(n_blocks, NS)
    lo = split * per_split * BN
    hi = tl.minimum(n_keys, lo + per_split * BN)
    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, D], tl.float32)
    limit = pos0 + t_row  # last key each row sees
    kv_base = kvh * s_ch
    for j0 in range(lo, hi, BN):
        keys = j0 + tl.arange(0, BN)
        in_range = keys < hi
        kt = tl.load(k_cache + kv_base + keys[:, None] * s_cs + dims[None, :], mask=in_range[:, None], other=0.0)
        if IEEE:
            s = tl.dot(qt, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt))
        s = s * sm_scale_log2
        seen = (keys[None, :] <= limit[:, None]) & in_range[None, :] & valid[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_cache + kv_base + keys[:, None] * s_cs + dims[None, :], mask=in_range[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    base = (kvh * NS + split) * R
    tl.store(ws_acc + (base + rows[:, None]) * D + dims[None, :], acc)
    tl.store(ws_ml + (base + rows) * 2, m_i)
    tl.store(ws_ml + (base + rows) * 2 + 1, l_i)


@triton.jit
def _combine_kernel(ws_acc, ws_ml, out, s_ot,
                    T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NS: tl.constexpr):
    kvh = tl.program_id(0)
    r = tl.program_id(1)
    splits = tl.arange(0, NS)
    dims = tl.arange(0, D)
    base = (kvh * NS + splits) * R + r
    m = tl.load(ws_ml + base * 2)
    lsum = tl.load(ws_ml + base * 2 + 1)
    m_max = tl.max(m, 0)  # finite: share 0 always holds key 0
    w = tl.exp2(m - m_max)  # 0 for shares that saw no key (m = -inf)
    acc = tl.load(ws_acc + base[:, None] * D + dims[None, :])
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    head = kvh * G + r // T
    tl.store(out + (r % T) * s_ot + head * D + dims, o.to(out.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    hq, t, d = q.shape
    hkv = k_cache.shape[0]
    if hq % hkv or t > 16 or d & (d - 1) or d < 16 or q.stride(2) != 1 or k_cache.stride(2) != 1 \
            or v_cache.stride() != k_cache.stride():
        raise ValueError(f"decode_attention: unsupported shapes q {tuple(q.shape)} cache {tuple(k_cache.shape)}")
    g = hq // hkv
    r = max(16, triton.next_power_of_2(g * t))
    ws_acc = torch.empty((hkv, NSPLIT, r, d), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((hkv, NSPLIT, r, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((t, hq * d), dtype=q.dtype, device=q.device)
    sm_scale_log2 = 1.0 / math.sqrt(d) * math.log2(math.e)
    _partial_kernel[(hkv, NSPLIT)](q, k_cache, v_cache, pos, ws_acc, ws_ml, sm_scale_log2,
                                   q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                                   T=t, G=g, D=d, R=r, NS=NSPLIT, BN=BLOCK_N, IEEE=q.dtype == torch.float32,
                                   num_warps=4)
    _combine_kernel[(hkv, g * t)](ws_acc, ws_ml, out, out.stride(0), T=t, G=g, D=d, R=r, NS=NSPLIT, num_warps=1)
    return out
