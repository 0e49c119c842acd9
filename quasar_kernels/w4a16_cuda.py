"""Marlin-style CUDA W4A16 GEMM for the verify pass (M = 1..16 rows), JIT-built on first use.

    packed = prepack_w4a16(qweight, scales, zeros, in_features, group_size)   # once, offline
    y = w4a16_cuda_linear(x, packed, bias=None)                               # x [..., K] bf16/fp16
    ok, why = available()

Input format: quasar_bench/packing.py (qweight int32 [Kp//8, N], scales/zeros fp16 [Kp//G, N],
W[n, k] = (code - zero) * scale). `prepack_w4a16` re-lays it out for the kernel
(quasar_kernels/csrc/w4a16_marlin.cu); `unpack_prepacked` inverts that exactly (the CPU tests check the
round trip, which is how CI checks the layout of a kernel that only runs on a GPU).

Packed layout (NT = ceil(N / 64) column tiles of 64, each group padded to Gp = ceil(G / 16) * 16
input channels, KT = NG * Gp / 16 k16 steps, NG = Kp / G groups):
  qpk   int32 [NT, KT, 32, 4]: tile (nt, kt) is one 512-byte warp load; lane l = 4 g + t holds
        4 words, word j nibble p (p = 4 h + 2 sb + r) = code of W[n, k'] with
        n = 64 nt + 8 (2 j + sb) + g and k' = 16 kt + 8 r + 2 t + h: the B fragments of
        mma.m16n8k16 for n8-subtiles 2j and 2j+1 (lop3 on q, q>>4, q>>8, q>>12 with mask
        0x000f000f gives the four bf16x2 / half2 fragment registers). Padded group channels hold
        the zero point, padded columns 0.
  scales_bf16 / scales_fp16 [NT, NG, 8, 8]: scale of column 64 nt + 8 s + g at [nt, gi, g, s]
        (one 16-byte load per lane and group); the kernel uses the one of x's dtype.
  zeros uint8 [NT, NG, 8, 8]: zero codes, same order (the kernel subtracts (magic + zero) exactly).
  dims  uint8 [0, N, K, G]: an empty tensor whose shape carries N, in_features and G (read
        without touching the device: safe under CUDA-graph capture, survives .to(device)).

The kernel: 8 warps per CTA (WN warps along N x WK along K), S K-splits, a persistent grid;
activations of the CTA's K range in shared memory, weights streamed several steps ahead with
16-byte ld.global.nc into a register ring (pipe=0) or with cp.async into a shared-memory ring
(pipe=1; both timed by the planner), dequant in registers (lop3 + bf16x2 sub + mul), mma.sync
m16n8k16 with fp32 accumulators. With S > 1 partials go to an fp32 workspace and the last CTA
of each column block to arrive sums them in split order and resets its counter (the workspace
and counters persist per device and are left ready for the next call: no per-call memset, safe
under CUDA-graph replay; do not run two calls concurrently on different streams of one device).
M > 16 runs one launch per 16-row chunk. The launch configuration comes from a small cost
model (`plan`); `config=` overrides it. See quasar_kernels/NOTES.md for measurements.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import torch

from quasar_bench.packing import pack_int4, unpack_int4

log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
_SOURCES = [_HERE / "csrc" / "w4a16_marlin.cu", _HERE / "csrc" / "w4a16_wgmma.cu", _HERE / "csrc" / "w4a16_binding.cpp"]
_EXT = None
_EXT_ERR: str | None = None
_LOCK = threading.Lock()

TILE_N = 64
NWARPS = 8


# ------------------------------------------------------------------------------------------
# build / load
# ------------------------------------------------------------------------------------------

# How the wgmma kernel stages each pipeline stage (a compile-time choice in csrc/w4a16_wgmma.cu): every
# thread's cp.async copies (shipped), the copy engine issued by one warp per stage ("tma"), a producer
# warp with per-buffer mbarriers and no per-stage CTA barrier ("ws"), or the shipped copies launched with
# programmatic dependent launch, so a launch's first weight copies overlap the previous kernel's end
# ("pdl"). The same products in the same order: outputs are bit for bit equal
# (quasar_kernels/microbench/wgmma_ablate.py --check). Chosen with QUASAR_WGMMA_STAGING so tests and
# benchmarks can run a candidate build before it becomes the default.
WGMMA_STAGINGS = {"cp.async": [], "tma": ["-DQB_WG_TMA=1"], "ws": ["-DQB_WG_WS=1"], "pdl": ["-DQB_WG_PDL=1"]}


def wgmma_staging() -> str:
    v = os.environ.get("QUASAR_WGMMA_STAGING", "") or "cp.async"
    if v not in WGMMA_STAGINGS:
        raise ValueError(f"QUASAR_WGMMA_STAGING={v!r} is not a staging build of the wgmma kernel; use one of "
                         f"{', '.join(WGMMA_STAGINGS)} (or unset it)")
    return v


def _ext_name() -> str:
    """The extension's name: the shipped build's, or suffixed by a candidate staging build's."""
    mode = wgmma_staging()
    return "w4a16_cuda" if mode == "cp.async" else f"w4a16_cuda_{mode}"


def _build_dir() -> Path:
    from quasar_bench.fileio import cache_root

    d = cache_root() / "torch_extensions" / _ext_name()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load():
    """Build (first time, ~1 min) or load the extension; raise RuntimeError if impossible."""
    global _EXT, _EXT_ERR
    if _EXT is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None:
            return _EXT
        if _EXT_ERR is not None:
            raise RuntimeError(_EXT_ERR)
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device visible to torch")
            if torch.version.cuda is None:
                raise RuntimeError("this torch build has no CUDA support")
            from torch.utils.cpp_extension import CUDA_HOME, load

            if CUDA_HOME is None:
                raise RuntimeError("nvcc / CUDA_HOME not found")
            flags = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17",
                     "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=sm_90"]
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) != (9, 0):  # still build something that runs on this device
                flags.append(f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}")
            old = os.environ.get("TORCH_CUDA_ARCH_LIST")
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            try:
                _EXT = load(name="quasar_" + _ext_name(), sources=[str(s) for s in _SOURCES],
                            extra_cuda_cflags=flags + WGMMA_STAGINGS[wgmma_staging()], extra_cflags=["-O3"],
                            build_directory=str(_build_dir()), verbose=bool(os.environ.get("QUASAR_VERBOSE_BUILD")))
            finally:
                if old is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = old
        except Exception as e:  # noqa: BLE001
            _EXT_ERR = f"the W4A16 CUDA kernel cannot be built or loaded: {e}"
            raise RuntimeError(_EXT_ERR) from e
    return _EXT


def available() -> tuple[bool, str]:
    """(True, "") if the CUDA kernel can run here (builds it on first call), else (False, reason)."""
    try:
        _load()
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"needs compute capability >= 8.0 (mma.sync bf16), found {major}.x"
        return True, ""
    except RuntimeError as e:
        return False, str(e)


# ------------------------------------------------------------------------------------------
# offline re-layout
# ------------------------------------------------------------------------------------------

def _geometry(n: int, kp: int, g: int):
    ng = kp // g
    gp = -(-g // 16) * 16
    kt = ng * gp // 16
    nt = -(-n // TILE_N)
    return ng, gp, kt, nt


def prepack_w4a16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                  group_size: int) -> dict:
    """Project int4 format -> the kernel's layout (pure torch; CPU or GPU, output on the same device)."""
    g = int(group_size)
    if g < 8 or g % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {g}")
    kp, n = qweight.shape[0] * 8, qweight.shape[1]
    if kp % g or scales.shape != (kp // g, n) or zeros.shape != (kp // g, n):
        raise ValueError(f"inconsistent int4 tensors: qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group {g}")
    if not (kp - g < in_features <= kp):
        raise ValueError(f"in_features={in_features} does not match Kp={kp} (group {g})")
    dev = qweight.device
    ng, gp, kt, nt = _geometry(n, kp, g)
    np_ = nt * TILE_N
    zc = zeros.float().round().clamp(0, 15).to(torch.uint8)  # [NG, N]
    # codes -> [Np, NG, Gp] with padded group channels = zero point, padded columns = 0
    qpk = torch.empty(nt, kt, 32, 4, dtype=torch.int32, device=dev)
    shifts = (torch.arange(8, device=dev, dtype=torch.int64) * 4)
    chunk = max(1, (1 << 24) // max(1, TILE_N * kt * 16))  # column tiles per pass (bounded temporaries)
    for t0 in range(0, nt, chunk):
        t1 = min(nt, t0 + chunk)
        n0, n1 = t0 * TILE_N, min(n, t1 * TILE_N)
        c = torch.zeros((t1 - t0) * TILE_N, ng, gp, dtype=torch.uint8, device=dev)
        codes = unpack_int4(qweight[:, n0:n1])  # [n1-n0, Kp]
        c[: n1 - n0, :, :g] = codes.view(n1 - n0, ng, g)
        if gp > g:
            c[: n1 - n0, :, g:] = zc[:, n0:n1].t().unsqueeze(-1)
        # n = 64 nt + 16 j + 8 sb + g ; k' = 16 kt + 8 r + 2 t + h
        c = c.view(t1 - t0, 4, 2, 8, kt, 2, 4, 2)  # nt, j, sb, g, kt, r, t, h
        c = c.permute(0, 4, 3, 6, 1, 7, 2, 5)  # nt, kt, g, t, j, h, sb, r
        c = c.reshape(t1 - t0, kt, 32, 4, 8).to(torch.int64)
        w = (c << shifts).sum(-1)
        w = torch.where(w >= 2**31, w - 2**32, w)
        qpk[t0:t1] = w.to(torch.int32)

    def relayout(a: torch.Tensor, fill) -> torch.Tensor:  # [NG, N] -> [NT, NG, 8 g, 8 s]
        full = torch.full((ng, np_), fill, dtype=a.dtype, device=dev)
        full[:, :n] = a
        return full.view(ng, nt, 8, 8).permute(1, 0, 3, 2).contiguous()

    s16 = relayout(scales.to(torch.float16), 0.0)
    return {
        "qpk": qpk,
        "scales_fp16": s16,
        "scales_bf16": s16.to(torch.bfloat16),
        "zeros": relayout(zc, 0),
        "dims": torch.empty(0, n, int(in_features), g, dtype=torch.uint8, device=dev),
    }


def packed_dims(packed: dict) -> tuple[int, int, int]:
    """(N, in_features, group_size) of a prepacked weight."""
    _, n, k, g = packed["dims"].shape
    return n, k, g


def unpack_prepacked(packed: dict):
    """Inverse of prepack_w4a16: (qweight int32 [Kp//8, N], scales fp16 [NG, N], zeros fp16 [NG, N])."""
    n, _k, g = packed_dims(packed)
    qpk = packed["qpk"]
    nt, kt = qpk.shape[0], qpk.shape[1]
    ng = packed["scales_fp16"].shape[1]
    gp = kt * 16 // ng
    shifts = (torch.arange(8, device=qpk.device, dtype=torch.int64) * 4)
    w = qpk.to(torch.int64) & 0xFFFFFFFF
    nib = ((w.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)  # nt, kt, 32, 4, 8
    nib = nib.view(nt, kt, 8, 4, 4, 2, 2, 2)  # nt, kt, g, t, j, h, sb, r
    c = nib.permute(0, 4, 6, 2, 1, 7, 3, 5).reshape(nt * TILE_N, ng, gp)  # nt, j, sb, g, kt, r, t, h
    codes = c[:n, :, :g].reshape(n, ng * g)
    qweight = pack_int4(codes)

    def back(a: torch.Tensor) -> torch.Tensor:  # [NT, NG, 8 g, 8 s] -> [NG, N]
        return a.permute(1, 0, 3, 2).reshape(ng, nt * TILE_N)[:, :n]

    return qweight, back(packed["scales_fp16"]).to(torch.float16).contiguous(), \
        back(packed["zeros"]).to(torch.float16).contiguous()


# ------------------------------------------------------------------------------------------
# launch planning
# ------------------------------------------------------------------------------------------

_PLANS: dict = {}
_SMS: dict = {}


def _num_sms(dev: torch.device) -> int:
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SMS[dev]


def ring_depth(occ: int) -> int:
    """512-byte weight loads in flight per warp in the build for `occ` CTAs per SM (csrc/w4a16_marlin.h)."""
    return 8 if occ == 2 else 16


def _smem_bytes(m: int, gps: int, spg: int, occ: int = 2, pipe: int = 0, swap: int = 0) -> int:
    r = 16 if m > 8 else 8
    ring = NWARPS * ring_depth(occ) * 512 if pipe else 0  # the cp.async ring (pipe=1)
    sums = gps * spg * 32 if swap else 0  # per-step sums of x (swap=1)
    return r * (gps * spg * 16 + 8) * 2 + r * NWARPS * 64 * 4 + ring + sums


def plan_cost(m, nt, ng, spg, wn, s, occ, sms, bw=2.9e6, pipe=0, swap=0):
    """Modelled time (µs) of one launch with (WN, S, occ, pipe, swap); inf if it does not fit. bw in
    B/µs. pipe: 0 = the register ring, 1 = the cp.async shared-memory ring. swap: 1 = weights as the
    MMA's A operand with the zero point and scale applied after it (M <= 8; modelled like swap=0,
    so the cost model alone never prefers it: only timing does)."""
    if swap and m > 8:
        return math.inf, None
    gps = -(-ng // s)
    s = -(-ng // gps)
    smem = _smem_bytes(m, gps, spg, occ, pipe, swap)
    if smem > 227 * 1024 or (occ == 2 and smem > 113 * 1024):
        return math.inf, None
    slots = sms * occ
    nblocks = -(-nt // wn)
    gx = min(nblocks, max(1, slots // s))
    tiles = -(-nblocks // gx)
    steps = gps * spg
    tile_bytes = wn * 64 * steps * 8 + wn * gps * 192
    pf = ring_depth(occ)
    # bytes in flight per CTA / effective latency (µs): the register ring's loads are issued ~3
    # steps before use (run 1 fit); the cp.async ring's exactly pf - 1 ahead (~1 µs latency assumed)
    cap = NWARPS * pf * 512 / 3.0 if not pipe else NWARPS * (pf - 1) * 512 / 1.0
    bw_cta = min(bw / (gx * s), cap)
    t_stream = tiles * tile_bytes / bw_cta
    t_a = m * steps * 32 / 60e3  # activations of the K range from L2, per CTA
    t_flush = tiles * 0.25
    if s > 1:
        t_flush += tiles * 0.6 + s * m * nt * 64 * 4 * 2 / 5e6
    return 1.5 + t_a + t_stream + t_flush, dict(WN=wn, S=s, gx=gx, occ=occ, pipe=pipe, swap=swap)


def model_plan(m: int, packed: dict, dev: torch.device, pipe: int | None = None, swap: int | None = None) -> dict:
    """The cheapest configuration under plan_cost (no timing); `pipe` restricts the ring kind."""
    qpk = packed["qpk"]
    nt, kt = qpk.shape[0], qpk.shape[1]
    ng = packed["scales_fp16"].shape[1]
    best = (math.inf, None)
    for cfg in candidate_configs(m, packed, dev, pipe, swap):
        c = plan_cost(m, nt, ng, kt // ng, cfg["WN"], cfg["S"], cfg["occ"], _num_sms(dev), pipe=cfg["pipe"],
                      swap=cfg["swap"])
        if c[0] < best[0]:
            best = c
    return best[1]


def tune_candidates(m: int, packed: dict, dev: torch.device, top: int = 4, pipe: int | None = None,
                    swap: int | None = None) -> list[dict]:
    """The model's `top` best plus a small grid (WN 1/2/4 x S 1/2/4/8, 2 CTAs/SM, both rings):
    what plan() times."""
    qpk = packed["qpk"]
    nt, kt = qpk.shape[0], qpk.shape[1]
    ng = packed["scales_fp16"].shape[1]
    cands = candidate_configs(m, packed, dev, pipe, swap)
    scored = sorted(cands, key=lambda c: plan_cost(m, nt, ng, kt // ng, c["WN"], c["S"], c["occ"], _num_sms(dev),
                                                   pipe=c["pipe"], swap=c["swap"])[0])
    pick = scored[:top]
    for c in cands:
        if c["WN"] in (1, 2, 4) and c["S"] in (1, 2, 4, 8) and c["occ"] == 2 and c not in pick:
            pick.append(c)
    return pick


def plan(m: int, packed: dict, dev: torch.device, pipe: int | None = None, swap: int | None = None) -> dict:
    """Launch configuration for a chunk of m <= 16 rows, cached per (m, geometry, device).

    On first use (outside CUDA-graph capture, unless QUASAR_KERNEL_AUTOTUNE=0) the candidates of
    tune_candidates are timed under a CUDA graph with L2 flushed before each call (as the weights
    of one layer are not in L2 during a forward) and the fastest is kept; otherwise the cost
    model's choice is used (and not cached while capturing). `pipe` (0 / 1) restricts the choice
    to one ring kind and `swap` (0 / 1) to one operand order (benchmarks compare them); None lets
    the timing pick. A candidate whose output differs from the plainest configuration's (rel err
    >= 1e-2) is logged and never chosen."""
    qpk = packed["qpk"]
    nt, kt = qpk.shape[0], qpk.shape[1]
    ng = packed["scales_fp16"].shape[1]
    if pipe is None and os.environ.get("QUASAR_W4A16_PIPE", "") in ("0", "1"):  # diagnostics: one ring only
        pipe = int(os.environ["QUASAR_W4A16_PIPE"])
    key = (m, nt, kt, ng, dev, pipe, swap)
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    from quasar_kernels.splitk import disk_get, disk_put, graph_time_us

    disk_key = f"w4a16_cuda|{_source_hash()}|m={m}|nt={nt}|kt={kt}|ng={ng}|pipe={pipe}|swap={swap}"
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    stored = disk_get(dev, disk_key) if dev.type == "cuda" else None
    if stored is not None:  # timed by an earlier run on this kind of GPU with this kernel source
        _PLANS[key] = stored["config"]
        return stored["config"]
    if capturing or os.environ.get("QUASAR_KERNEL_AUTOTUNE", "1") == "0" or dev.type != "cuda":
        cfg = model_plan(m, packed, dev, pipe, swap)
        if not capturing:
            _PLANS[key] = cfg
        return cfg
    n, k, _ = packed_dims(packed)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    # every candidate must compute what the plainest configuration computes before it is timed
    plain = dict(model_plan(m, packed, dev, 0), swap=0)
    _workspace(dev, plain["S"] * 16 * nt * TILE_N, -(-nt // plain["WN"]))
    want = w4a16_cuda_linear(x, packed, config=plain).float()
    best, best_t = None, math.inf
    for cfg in tune_candidates(m, packed, dev, pipe=pipe, swap=swap):
        try:
            _workspace(dev, cfg["S"] * 16 * nt * TILE_N, -(-nt // cfg["WN"]))
            got = w4a16_cuda_linear(x, packed, config=cfg).float()
            err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            if not err < 1e-2:  # a wrong kernel variant must never win on speed
                log.warning("W4A16 CUDA config %s disagrees with %s (rel err %.2e): not used", cfg, plain, err)
                continue
            t = graph_time_us([lambda c=cfg: w4a16_cuda_linear(x, packed, config=c)], calls=10, flush=True, replays=5)
        except Exception:  # noqa: BLE001
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        best = model_plan(m, packed, dev, pipe, swap)
    else:
        disk_put(dev, disk_key, best, best_t)
    _PLANS[key] = best
    return best


def _source_hash() -> str:
    """Of the kernel's sources: a tuned configuration is reused only for the code it was timed on."""
    import hashlib

    global _SRC_HASH
    if _SRC_HASH is None:
        h = hashlib.sha256()
        for f in sorted(_SOURCES + [_HERE / "csrc" / h for h in ("w4a16_marlin.h", "w4a16_device.cuh",
                                                                  "w4a16_wgmma_ops.inc")]):
            h.update(f.read_bytes())
        h.update(wgmma_staging().encode())  # and the build's staging: plans are timed per build
        _SRC_HASH = h.hexdigest()[:12]
    return _SRC_HASH


_SRC_HASH: str | None = None


def candidate_configs(m: int, packed: dict, dev: torch.device, pipe: int | None = None,
                      swap: int | None = None) -> list[dict]:
    """Every valid (WN, S, occ, pipe) with its persistent grid size (for sweeps)."""
    qpk = packed["qpk"]
    nt, kt = qpk.shape[0], qpk.shape[1]
    ng = packed["scales_fp16"].shape[1]
    spg = kt // ng
    sms = _num_sms(dev)
    splits = sorted({-(-ng // gps) for gps in range(1, ng + 1)})
    swaps = (0, 1) if m <= 8 and os.environ.get("QUASAR_W4A16_SWAP", "1") != "0" else (0,)
    if swap is not None:
        swaps = tuple(v for v in swaps if v == swap)
    out = []
    for wn in (1, 2, 4, 8):
        for s in splits:
            if s > 64:
                continue
            for occ in (2, 1):
                for p in (0, 1) if pipe is None else (pipe,):
                    for sw in swaps:
                        c, cfg = plan_cost(m, nt, ng, spg, wn, s, occ, sms, pipe=p, swap=sw)
                        if cfg is not None:
                            out.append(cfg)
    return out


# ------------------------------------------------------------------------------------------
# workspace (split-K partials + arrival counters), persistent per device
# ------------------------------------------------------------------------------------------

_WS: dict = {}
_KEEP: list = []  # buffers replaced by larger ones stay alive: captured graphs may hold their pointers


def _workspace(dev: torch.device, ws_elems: int, n_cnt: int):
    cur = _WS.get(dev)
    if cur is not None and cur[0].numel() >= ws_elems and cur[1].numel() >= n_cnt:
        return cur
    ws_elems = max(ws_elems, 1 << 20, cur[0].numel() if cur else 0)
    n_cnt = max(n_cnt, 4096, cur[1].numel() if cur else 0)
    new = (torch.empty(ws_elems, dtype=torch.float32, device=dev),
           torch.zeros(n_cnt, dtype=torch.int32, device=dev))
    if torch.cuda.is_current_stream_capturing():
        return new  # allocated (and zeroed) inside the capture: used by this call only
    if cur is not None:
        _KEEP.append(cur)
    _WS[dev] = new
    return new


def prepare(packed: dict, ms=range(1, 17)) -> None:
    """Build the extension and size the workspace for these M (call before CUDA-graph capture)."""
    _load()
    dev = packed["qpk"].device
    nt = packed["qpk"].shape[0]
    for m in ms:
        cfg = plan(min(16, m), packed, dev)
        _workspace(dev, cfg["S"] * 16 * nt * TILE_N, -(-nt // cfg["WN"]))


# ------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------

def w4a16_cuda_linear(x: torch.Tensor, packed: dict, bias=None, *, config: dict | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ bias) with W prepacked by prepack_w4a16; y in x's dtype."""
    if x.device.type != "cuda":
        raise RuntimeError("w4a16_cuda_linear needs CUDA tensors (use the reference/Triton backend on CPU)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"w4a16_cuda_linear: x must be bfloat16 or float16, got {x.dtype}")
    ext = _load()
    n, k, g = packed_dims(packed)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    qpk = packed["qpk"]
    if qpk.device != x.device:
        raise RuntimeError(f"x is on {x.device}, the packed weight on {qpk.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m_all = x2.shape[0]
    out = torch.empty(m_all, n, dtype=x.dtype, device=x.device)
    if m_all == 0:
        return out.view(*lead, n)
    scl = packed["scales_bf16"] if x.dtype == torch.bfloat16 else packed["scales_fp16"]
    if bias is not None:
        bias = bias.to(dtype=x.dtype).contiguous()
    nt = qpk.shape[0]
    for m0 in range(0, m_all, 16):
        mc = min(16, m_all - m0)
        cfg = config or plan(mc, packed, x.device)
        ws, cnt = _workspace(x.device, cfg["S"] * 16 * nt * TILE_N if cfg["S"] > 1 else 0, -(-nt // cfg["WN"]))
        ext.w4a16_verify_gemm(x2[m0:m0 + mc], qpk, scl, packed["zeros"], out[m0:m0 + mc], bias, ws, cnt,
                              n, k, g, cfg["WN"], cfg["S"], cfg["gx"], cfg["occ"], cfg.get("pipe", 0),
                              cfg.get("swap", 0))
    return out.view(*lead, n)


# ------------------------------------------------------------------------------------------
# batched verification on Hopper: the wgmma kernel (csrc/w4a16_wgmma.cu), same packed tensors
# ------------------------------------------------------------------------------------------

def wgmma_available(dev: torch.device | None = None) -> tuple[bool, str]:
    """(True, "") where the wgmma kernel runs: an sm_90 GPU (H100 / H200) and the extension built."""
    ok, why = available()
    if not ok:
        return ok, why
    cc = torch.cuda.get_device_capability(dev)
    if cc != (9, 0):
        return False, f"the wgmma kernel needs compute capability 9.0 (Hopper), found {cc[0]}.{cc[1]}"
    return True, ""


def wgmma_tokens_per_cta(m: int) -> int:
    """Tokens per CTA (the wgmma's N): 32 up to 32 rows, 64 up to 64, then 128 per token block."""
    return 32 if m <= 32 else (64 if m <= 64 else 128)


def wgmma_pack(packed: dict) -> torch.Tensor:
    """The wgmma kernel's weight layout, made once per packed weight and kept in it (as "qwg"; a second
    copy of the int4 words beside "qpk"): int32 [NT, KS, 4, 2, 32, 4] with KS = ceil(KT / 8) stages of
    8 k16 steps, [nt, s, w, h, l, i] = qpk[nt, 8 s + 4 h + i, l, w] (zero words past KT). Warp w of a
    warpgroup then reads its A fragments of a stage as two contiguous 512-byte runs, one 16-byte load
    per lane each, where qpk's word w of every lane's 16 bytes is a 4-way bank conflict per load."""
    qwg = packed.get("qwg")
    if qwg is None:
        if packed["qpk"].is_cuda and torch.cuda.is_current_stream_capturing():  # the copy would live in the graph's pool, unfilled
            raise RuntimeError("wgmma_pack called during CUDA-graph capture: run one forward before capturing")
        qpk = packed["qpk"]
        nt, kt = qpk.shape[0], qpk.shape[1]
        ks = -(-kt // 8)
        pad = torch.zeros(nt, ks * 8, 32, 4, dtype=torch.int32, device=qpk.device)
        pad[:, :kt] = qpk
        qwg = pad.view(nt, ks, 2, 4, 32, 4).permute(0, 1, 5, 2, 4, 3).contiguous()
        packed["qwg"] = qwg
    return qwg


# (warpgroups per CTA, 64-row tiles per warpgroup) the wgmma kernel is built for: 2 warpgroups (2 CTAs
# per SM at one tile each) or 3 (one CTA per SM; 128 blocks of gate+up's 384 tiles, one per SM).
WGMMA_SHAPES = ((2, 1), (2, 2), (3, 1))


def wgmma_blocks_stages(packed: dict, nw: int, wg: int = 2) -> tuple[int, int]:
    """(column blocks of 64 wg nw rows, stages of 8 k16 steps per block): the kernel's work units are
    their product, per token block."""
    nt, kt = packed["qpk"].shape[0], packed["qpk"].shape[1]
    return -(-nt // (wg * nw)), -(-kt // 8)


def wgmma_parts(blocks: int, stages: int, ctas: int) -> int:
    """The most CTAs that share one column block when `ctas` CTAs split blocks x stages units evenly
    (1: every CTA owns whole blocks); the workspace holds that many partials per output."""
    if ctas == blocks:
        return 1
    per = blocks * stages // ctas
    return -(-stages // per) + 1


def wgmma_ctas(m: int, packed: dict, nw: int, tb: int, sms: int, wg: int = 2) -> list[int]:
    """CTA counts per token block worth timing: one per column block (no shared blocks); S per block
    with S dividing the stages (each CTA one K-slice of one block: classic split-K, the best split
    for the narrow shapes in run 7b), up to one wave; and the counts that give every SM the same
    number of stages (1 and 2 waves of resident CTAs: ranges that cross blocks)."""
    blocks, stages = wgmma_blocks_stages(packed, nw, wg)
    zb = -(-m // tb)
    resident = sms * (2 if nw == 1 and tb <= 64 and wg == 2 else 1)  # CTAs per SM the build allows
    out = {blocks}
    splits = [s for s in range(2, 17) if stages % s == 0 and blocks * s * zb <= resident]
    if splits:
        out.add(blocks * splits[-1])
    for waves in (1, 2):
        c = max(1, waves * resident // zb)
        if c < blocks * stages:
            out.add(c)
    return sorted(out)


def wgmma_plan(m: int, packed: dict, dev: torch.device) -> dict:
    """{"ctas": CTAs per token block, "tb": tokens per CTA, "nw": 64-row weight tiles per warpgroup (1 or
    2), "wg": warpgroups per CTA (2 or 3)} for m rows: every configuration is checked against the mma.sync kernel, then timed, once per
    (token blocks of m, geometry, device), and the fastest kept on disk like plan(); while capturing
    or without autotuning, one wave of resident CTAs sharing the work evenly."""
    qpk = packed["qpk"]
    nt, kt = qpk.shape[0], qpk.shape[1]
    ng = packed["scales_fp16"].shape[1]
    tb = wgmma_tokens_per_cta(m)
    # every m with the same token blocks launches the same grid (rows past m are zero-filled): tune
    # once per block count, at its largest m, so a ragged batch does not re-tune at each new M
    m = -(-m // tb) * tb
    key = ("wgmma", m, nt, kt, ng, dev)
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    from quasar_kernels.splitk import disk_get, disk_put, graph_time_us

    sms = _num_sms(dev)
    blocks, stages = wgmma_blocks_stages(packed, 1)
    model = dict(ctas=min(blocks * stages, max(1, 2 * sms // -(-m // tb))), tb=tb, nw=1, wg=2)  # one wave, 2 CTAs / SM
    disk_key = f"w4a16_wgmma|{_source_hash()}|m={m}|nt={nt}|kt={kt}|ng={ng}"
    stored = disk_get(dev, disk_key)
    if stored is not None:
        _PLANS[key] = stored["config"]
        return stored["config"]
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing or os.environ.get("QUASAR_KERNEL_AUTOTUNE", "1") == "0":
        if not capturing:
            _PLANS[key] = model
        return model
    n, k, _ = packed_dims(packed)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    want = w4a16_cuda_linear(x, packed).float()  # the mma.sync kernel's 16-row passes
    best, best_t, wrong = model, math.inf, []
    # also the next smaller token tile (two token blocks of 32 at 33..64 rows: on the narrow shapes the
    # 64-token build lost to Triton in run 7c, where the 32-token one did not)
    tbs = (tb, tb // 2) if tb > 32 else (tb,)
    for cfg in [dict(ctas=c, tb=t, nw=nw, wg=wg) for t in tbs for wg, nw in WGMMA_SHAPES
                for c in wgmma_ctas(m, packed, nw, t, sms, wg)]:
        try:
            got = w4a16_wgmma_linear(x, packed, config=cfg).float()
            err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            if not err < 1e-2:
                log.warning("W4A16 wgmma config %s disagrees with the mma.sync kernel (rel err %.2e)", cfg, err)
                wrong.append(cfg)
                continue
            t = graph_time_us([lambda c=cfg: w4a16_wgmma_linear(x, packed, config=c)], calls=10, flush=True, replays=5)
        except Exception as e:  # noqa: BLE001
            log.info("W4A16 wgmma m=%d %dx%d %s: failed (%s)", m, n, k, cfg, e)
            continue
        log.info("W4A16 wgmma m=%d %dx%d %s: %.1f us", m, n, k, cfg, t)
        if t < best_t:
            best, best_t = cfg, t
    if best_t == math.inf:
        if wrong:  # never hand out a configuration that computed something else
            raise RuntimeError(f"the W4A16 wgmma kernel disagrees with the mma.sync kernel at m={m} rows for a "
                               f"{n}x{k} weight in every configuration tried (a kernel bug); use "
                               "verifier.kernel=triton or cuda")
    else:
        disk_put(dev, disk_key, best, best_t)
    _PLANS[key] = best
    return best


def w4a16_wgmma_linear(x: torch.Tensor, packed: dict, bias=None, *, config: dict | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ bias) through the wgmma kernel (Hopper; any number of rows; `auto`
    gives it 9 to 192). Needs group_size = 16 x a power of two and K % 8 == 0 (ValueError otherwise)."""
    n, k, g = packed_dims(packed)
    if g % 16 or k % 8 or (g // 16) & (g // 16 - 1):
        raise ValueError(f"the wgmma kernel needs group_size % 16 == 0 with group_size / 16 a power of two, and "
                         f"in_features % 8 == 0 (got {g}, {k}); use w4a16_cuda_linear")
    if config is not None and (config.get("wg", 2), config.get("nw", 1)) not in WGMMA_SHAPES:
        raise ValueError(f"wgmma config wg={config.get('wg', 2)}, nw={config.get('nw', 1)}: (warpgroups, tiles per "
                         f"warpgroup) must be one of {WGMMA_SHAPES}")
    if x.device.type != "cuda":
        raise RuntimeError("w4a16_wgmma_linear needs CUDA tensors")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"w4a16_wgmma_linear: x must be bfloat16 or float16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    ext = _load()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    cfg = config or wgmma_plan(m, packed, x.device)
    nw, tb, wg = cfg.get("nw", 1), cfg["tb"], cfg.get("wg", 2)
    blocks, stages = wgmma_blocks_stages(packed, nw, wg)
    ctas = cfg["ctas"]
    if not 1 <= ctas <= blocks * stages:
        raise ValueError(f"ctas={ctas} must be in [1, {blocks * stages}] (column blocks x stages)")
    parts = wgmma_parts(blocks, stages, ctas)
    nt = packed["qpk"].shape[0]
    # partials of a shared block in the kernel's fragment order: [parts][token blocks][column blocks][wg nw tiles][64 x tb]
    ws, cnt = _workspace(x.device, parts * -(-m // tb) * blocks * wg * nw * TILE_N * tb if parts > 1 else 0,
                         blocks * -(-m // tb))
    scl = packed["scales_bf16"] if x.dtype == torch.bfloat16 else packed["scales_fp16"]
    if bias is not None:
        bias = bias.to(dtype=x.dtype).contiguous()
    ext.w4a16_wgmma_gemm(x2, wgmma_pack(packed), scl, packed["zeros"], out, bias, ws, cnt, n, k, g,
                         packed["qpk"].shape[1], ctas, tb, nw, wg)
    return out.view(*lead, n)
