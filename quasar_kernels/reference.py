"""Pure-torch references for the kernels: the same math, dequantize then matmul in fp32.

Each `*_ref` function takes the same arguments as its kernel and returns [..., N] in x's dtype.
They are also the `reference` kernel backend (quasar_bench/backends/reference.py) and so the CPU
path of every quantized verifier: the function the kernel tests compare against is the one that
runs, not a copy. The building blocks take an already-dequantized (or chunked) weight so the
backend can compute it once per module instead of every call.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from quasar_bench.packing import dequantize_int4, dequantize_int8

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# Sums of int8 x int8 products stay exact in fp32 while |sum| < 2^24: 1024 products of at most
# 127^2 each reach 16.5e6 < 16.78e6. Longer dot products are split into chunks of this length.
EXACT_F32_CHUNK = 1024

# CPU fp32 products go through a copy of the weight that oneDNN packed once (its blocked layout), not
# F.linear, whose sgemm (we infer: packing the weight on every call above 2 rows) made a 6-token
# SmolLM2 verify step 50 ms instead of 39 (2-core EPYC, torch 2.13). With 1 or 2 rows it depends on
# the host: on one 2-core EPYC F.linear's 1-row product was fast (a 29 ms SmolLM2 AR step; the pack
# was not timed there), on
# another it took 52 ms against 38 packed and 86 ms against 44 at 2 rows (experiments/cpu_small_rows.py,
# results/cpu_small_rows.md). So the
# fewest rows that take the pack (`pack_min_rows`) is measured once per process ("auto", below) or
# set with QUASAR_CPU_PACK_MIN_ROWS=1|2|3; runs record it (another summation order for those
# products). Same product up to fp32 summation order. The packed copies double the fp32 weight
# memory of a CPU run: QUASAR_CPU_PACKED=0 turns them off (slower; the same products in another
# summation order, which GPTQ's codes and W8A8's roundings follow: runs record the switch).
CPU_PACKED = os.environ.get("QUASAR_CPU_PACKED", "1") != "0"
PACK_MIN_ROWS: int | None = None  # None: not decided yet (pack_min_rows())
PROBE_MARGIN = 0.9  # the pack must take at most this share of F.linear's time to get 1- or 2-row products
_packed = WeakTensorKeyDictionary()  # weight -> (its version, data pointer, packed copy)


def cpu_packed() -> bool:
    """Whether CPU fp32 products (of pack_min_rows() rows or more) run on oneDNN-packed weights here."""
    return CPU_PACKED and _ONEDNN


def _cpu_packed(w: torch.Tensor) -> torch.Tensor:
    """oneDNN-packed copy of w, made on first use and remade when w is changed in place."""
    # inference tensors (made under torch.inference_mode) keep no version counter
    key = (None if w.is_inference() else w._version, w.data_ptr())
    hit = _packed.get(w)
    if hit is None or hit[0] != key:
        hit = _packed[w] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8))
    return hit[1]


def packed_copy(w: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy kept for w, if one was made (rows.resident_weight_bytes counts it)."""
    hit = _packed.get(w)
    return None if hit is None else hit[1]


def pack_min_rows() -> int:
    """The fewest rows a CPU fp32 product needs to run on the packed weight (1, 2 or 3): from
    QUASAR_CPU_PACK_MIN_ROWS, or measured on first use and kept for the process (`probe_pack_min_rows`)."""
    global PACK_MIN_ROWS
    if PACK_MIN_ROWS is None:
        value = os.environ.get("QUASAR_CPU_PACK_MIN_ROWS", "auto")
        if value == "auto":
            PACK_MIN_ROWS = probe_pack_min_rows() if cpu_packed() else 3
        elif value in ("1", "2", "3"):
            PACK_MIN_ROWS = int(value)
        else:
            raise ValueError(f"QUASAR_CPU_PACK_MIN_ROWS={value!r}: use 1, 2, 3 or auto")
    return PACK_MIN_ROWS


def probe_pack_min_rows(timer=None) -> int:
    """1 if the packed product of 1 row takes at most PROBE_MARGIN of F.linear's time, else 2 if
    that holds at 2 rows, else 3. Timed as a forward reads its weights: a sweep over 32 weights of
    1024 x 1024 (128 MB, more than a CPU's last-level cache, so read from memory), median of 5
    sweeps after one untimed; `timer(sweep)` -> seconds (tests)."""
    weights = [torch.empty(1024, 1024).uniform_(-1, 1) for _ in range(32)]
    packs = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]

    def median_time(sweep, repeats=5):
        sweep()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sweep()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[repeats // 2]

    timer = timer or median_time
    for rows in (1, 2):
        x = torch.randn(rows, 1024)
        plain = timer(lambda: [F.linear(x, w) for w in weights])
        pack = timer(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packs])
        if pack <= PROBE_MARGIN * plain:
            return rows
    return 3


def _packable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (cpu_packed() and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.dim() == 2 and x.numel() >= pack_min_rows() * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear(x, w, bias); on the CPU in fp32 with pack_min_rows() rows or more, through the
    oneDNN-packed weight."""
    if not _packable(x, w):
        return F.linear(x, w, bias)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    b = None if bias is None else bias.detach()
    out = torch.ops.mkldnn._linear_pointwise(x2, _cpu_packed(w), b, "none", [], "")
    return out.reshape(*x.shape[:-1], w.shape[0])


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


def exact_chunks(wq: torch.Tensor) -> tuple:
    """Int8 weight codes [N, K] (any float or int dtype) as fp32 [N, <= EXACT_F32_CHUNK] column
    chunks: the form int8_matmul_exact takes (kept per module on the CPU, so each is packed once)."""
    wf = wq.float()
    return tuple(wf[:, s : s + EXACT_F32_CHUNK].contiguous() for s in range(0, wf.shape[1], EXACT_F32_CHUNK))


def int8_matmul_exact(xq: torch.Tensor, chunks: tuple) -> torch.Tensor:
    """Exact integer sums of int8 products, float64 [M, N]: xq int8 [M, K] times the weight codes
    given as exact_chunks(wq). fp32 products over K-chunks short enough to stay exact, chunk sums in
    float64: the same integers as int32 accumulation, for any M and on any device."""
    a = xq.float()
    acc, s = None, 0
    for w in chunks:
        part = linear(a[:, s : s + w.shape[1]], w).double()
        acc = part if acc is None else acc + part
        s += w.shape[1]
    return acc


def w8a8_from_codes(x: torch.Tensor, chunks: tuple, scales, bias=None) -> torch.Tensor:
    """W8A8 with the weight codes given as exact_chunks(qweight): per-token int8 activations, exact
    integer products, then the two scales."""
    q, xs = quantize_per_token_ref(x)
    acc = int8_matmul_exact(q.reshape(-1, x.shape[-1]), chunks)
    y = (acc * scales.double()[None, :]).float().reshape(*x.shape[:-1], -1) * xs[..., None]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a8_linear_ref(x, qweight, scales, bias=None):
    return w8a8_from_codes(x, exact_chunks(qweight), scales, bias)
