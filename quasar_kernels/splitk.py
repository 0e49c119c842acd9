"""Split-K and autotuning machinery shared by the Triton verify GEMMs (w4a16, w8a16, w8a8).

With few rows (M = k + 1), a grid over N alone leaves most SMs idle for the small projections, so
the K loop is split across programs (split-K): each program writes an fp32 partial [M, N]; the
last split to arrive at an output tile (an atomic counter) sums the partials in split order
(deterministic), adds the bias and casts. A split of 1 writes the output directly.

The small autotuner is keyed on (kernel, M bucket, N, K, dtype) and times candidates under CUDA
graphs (an eager call costs more in launch time than the kernel): warm up (one eager call per shape
and M bucket) before capturing graphs.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# shared machinery: split-K reduce, configs, autotune
# --------------------------------------------------------------------------------------------

log = logging.getLogger("quasar_bench.kernels")
_TORCH_TO_TL_OK = (torch.float16, torch.bfloat16, torch.float32)


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not interpret_mode():
        raise RuntimeError(
            "Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before `kernels` is imported "
            "to run CPU tensors through Triton's interpreter"
        )
    if x.dtype not in _TORCH_TO_TL_OK:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")


def m_bucket(m: int) -> int:
    """Power of two >= m (1, 2, 4, ..., 64), then multiples of 64: the autotune key's M."""
    if m <= 64:
        return 1 << max(0, (m - 1).bit_length())
    return 64 * math.ceil(m / 64)


def block_m_for(m: int) -> int:
    """tl.dot needs at least 16 rows: M = 1..16 pads to one 16-row tile, larger M tiles by 32/64."""
    return min(64, max(16, m_bucket(m)))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_for(waves: float, n_programs: int, k_tiles: int, sms: int) -> int:
    """Split-K factor that brings the grid to about `waves` x SMs programs (>= 1 K tile each)."""
    s = max(1, math.ceil(waves * sms / max(1, n_programs)))
    s = min(s, k_tiles)
    # re-balance so no split is left with no tile
    per = math.ceil(k_tiles / s)
    return math.ceil(k_tiles / per)


@triton.jit
def _splitk_reduce_kernel(p_ptr, bias_ptr, out_ptr, MN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[M, N] = sum_s partial[s, M, N] (+ bias), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_out(acc, idx, mask, offs_n, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(M, N, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile over grid (N blocks, K splits, M blocks): its row and column
    offsets, their masks, and where its K range starts (split program_id(1) of K_SPLIT each)."""
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N, tl.program_id(1) * K_SPLIT


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, n_split, bias_ptr, out_ptr, part_ptr, cnt_ptr,
              HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr):
    """Write one fp32 [BLOCK_M, BLOCK_N] tile. SPLIT_MODE 0: no split, (+ bias) cast and store.
    1: store the fp32 partial of split program_id(1); splitk_reduce() finishes in a second launch.
    2: store the partial, then the last split to arrive at this tile (an atomic counter) sums all
    partials in split order (deterministic whatever the arrival order), writes the output and
    resets the counter: one launch instead of two."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    idx = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_MODE == 0:
        _write_out(acc, idx, mask, offs_n, N, bias_ptr, out_ptr, HAS_BIAS)
    else:
        tl.store(part_ptr + tl.program_id(1) * M * N + idx, acc, mask=mask)
        if SPLIT_MODE == 2:
            tl.debug_barrier()  # every thread's partial is stored before the release below
            tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == n_split - 1:
                total = tl.zeros_like(acc)
                for s in range(0, n_split):  # .cg: read through L2, the partials came from other SMs
                    total += tl.load(part_ptr + s * M * N + idx, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile, 0)
                _write_out(total, idx, mask, offs_n, N, bias_ptr, out_ptr, HAS_BIAS)


def splitk_reduce(partial: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    s, m, n = partial.shape
    block = 1024
    grid = (triton.cdiv(m * n, block),)
    _splitk_reduce_kernel[grid](partial, bias if bias is not None else partial, out, m * n, n, s,
                                HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def autotune_enabled(x: torch.Tensor) -> bool:
    return (x.device.type == "cuda" and os.environ.get("QUASAR_KERNEL_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


_FLUSH: dict = {}


def graph_time_us(fns, calls: int = 24, flush: bool = False, replays: int = 7) -> float:
    """Median GPU time of one call: CUDA-graph replays of `calls` back-to-back calls.

    A graph takes the Python launch cost (tens to hundreds of microseconds here, more than these
    kernels' GPU time) out of the number, as a decode loop under CUDA graphs would. `fns` run
    round-robin: give enough weight copies that together they exceed L2, or set flush=True to
    zero a 2 x L2 buffer before each call (its time is included: fine for ranking configs).
    """
    dev = torch.device("cuda", torch.cuda.current_device())
    if flush and dev not in _FLUSH:
        _FLUSH[dev] = torch.empty(2 * torch.cuda.get_device_properties(dev).L2_cache_size, dtype=torch.uint8,
                                  device=dev)
    calls = max(calls, len(fns))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            if flush:
                _FLUSH[dev].zero_()
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


# (kernel name, M bucket, N, K, dtype) -> (config, median time in us or None)
TUNE_CACHE: dict = {}
_DISK: dict = {"path": None, "entries": None}


def _disk_path(device) -> "os.PathLike":
    """One JSON file of tuned configs per GPU model and triton version under the cache root
    ($QUASAR_CACHE or ~/.cache/quasar_bench/autotune/): a second run on the same kind of GPU starts
    timing without re-tuning. $QUASAR_AUTOTUNE_FILE names the file instead: GPU calls on different
    machines of one kind then run the same kernel configurations (a committed file pins them;
    autotuning is timed, so two fresh tunings can pick different tiles)."""
    from quasar_bench.fileio import cache_root

    if os.environ.get("QUASAR_AUTOTUNE_FILE"):
        return Path(os.path.expanduser(os.environ["QUASAR_AUTOTUNE_FILE"]))
    gpu = torch.cuda.get_device_name(device).replace(" ", "_")
    return cache_root() / "autotune" / f"{gpu}-triton{triton.__version__}.json"


def _disk_key(key) -> str:
    name, mb, n, k, dtype = key
    return f"{name}|{mb}|{n}|{k}|{str(dtype).removeprefix('torch.')}"


def _disk_entries(device) -> dict:
    if _DISK["entries"] is None:
        from quasar_bench.fileio import read_json

        _DISK["path"] = _disk_path(device)
        _DISK["entries"] = read_json(_DISK["path"]) or {}
    return _DISK["entries"]


def disk_get(device, key: str):
    """A tuned entry {"config", "us"} stored under `key` for this kind of GPU, or None (also for
    other kernels than the Triton ones: the CUDA W4A16 planner keeps its choices here too)."""
    return _disk_entries(device).get(key)


def disk_put(device, key: str, cfg, t) -> None:
    from quasar_bench.fileio import write_json

    entries = _disk_entries(device)
    entries[key] = {"config": cfg, "us": t}
    try:
        write_json(_DISK["path"], entries)
    except OSError:  # a read-only cache: tuning still works, it is just not kept
        pass


def _disk_save(key, cfg, t) -> None:
    disk_put(None, _disk_key(key), cfg, t)


def tune_key(name: str, m: int, n: int, k: int, dtype) -> tuple:
    """The autotuner's key: (kernel name, M bucket, N, K, dtype)."""
    return (name, m_bucket(m), n, k, dtype)


def tuned_config(name: str, m: int, n: int, k: int, dtype) -> dict | None:
    """The configuration the autotuner picked for this key in this process, or None (not tuned yet)."""
    hit = TUNE_CACHE.get(tune_key(name, m, n, k, dtype))
    return hit[0] if hit is not None else None


def pick_config(name: str, x: torch.Tensor, n: int, k: int, candidates_fn, launch) -> dict:
    """Return the config to use for this (M bucket, N, K).

    candidates_fn() lists configs, the heuristic default first. On CUDA (unless
    QUASAR_KERNEL_AUTOTUNE=0, or while a CUDA graph is being captured) every candidate is timed
    once per key by graph_time_us with L2 flushed before each call (the weights of one layer are
    not in L2 during a real forward) and the fastest is kept. `launch(cfg)` runs the op once.
    """
    key = tune_key(name, x.shape[0], n, k, x.dtype)
    hit = TUNE_CACHE.get(key)
    if hit is not None:
        return hit[0]
    if x.is_cuda:
        stored = _disk_entries(x.device).get(_disk_key(key))
        if stored is not None:
            TUNE_CACHE[key] = (stored["config"], stored["us"])
            return stored["config"]
    candidates = candidates_fn()
    if not autotune_enabled(x) or len(candidates) == 1:
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            TUNE_CACHE[key] = (candidates[0], None)
        return candidates[0]
    best, best_t = candidates[0], float("inf")
    t0 = time.perf_counter()
    for cfg in candidates:
        try:
            t = graph_time_us([lambda: launch(cfg)], calls=10, flush=True, replays=5)
        except Exception:  # e.g. out of shared memory for this tile: skip the candidate
            continue
        if t < best_t:
            best, best_t = cfg, t
    TUNE_CACHE[key] = (best, best_t)
    _disk_save(key, best, best_t)
    log.info("autotuned %s M<=%d N=%d K=%d: %d configs in %.1f s (best %.1f us; cached in %s)", name, key[1], n, k,
             len(candidates), time.perf_counter() - t0, best_t, _DISK["path"])
    return best


def tile_candidates(x, n, k_total, tiles, default_tile, block_m=None, extra=None, waves=(0, 1, 2, 4)):
    """Configs {BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages} (+ `extra`): the default
    tile first (split to ~2 waves), then each tile in `tiles` with the K-split that fills about each
    of `waves` waves of SMs (0: no split)."""
    m = x.shape[0]
    sms = num_sms(x.device)
    bm = block_m or block_m_for(m)
    m_blocks = triton.cdiv(m, bm)

    def cfg(bn, bk, warps, stages, waves):
        n_prog = triton.cdiv(n, bn) * m_blocks
        k_tiles = triton.cdiv(k_total, bk)
        split = split_for(waves, n_prog, k_tiles, sms) if waves else 1
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages,
                    **(extra or {}))

    out = [cfg(*default_tile, 2)] if default_tile else []
    if autotune_enabled(x):
        for t in tiles:
            for w in waves:
                c = cfg(*t, w)
                if c not in out:
                    out.append(c)
    return out


# Tried with 128-row blocks once M > 64 (batched verification: M = B (k+1) reaches ~200): each
# weight tile is then loaded and dequantized once per 128 rows instead of once per 64. Candidates
# only: the autotuner keeps them where they time faster (block_m_for's 64 stays the default).
LARGE_M_TILES = [(64, 64, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3)]  # (BLOCK_N, BLOCK_K, warps, stages)


def large_m_candidates(x, n, k_total, extra=None):
    """tile_candidates with BLOCK_M = 128 over LARGE_M_TILES when M > 64 and autotuning; else []."""
    if x.shape[0] <= 64 or not autotune_enabled(x):
        return []
    # 2+ row blocks already fill the GPU with few K-splits: no split or ~1 wave (6 compiles at most)
    return tile_candidates(x, n, k_total, LARGE_M_TILES, None, block_m=128, extra=extra, waves=(0, 1))


def with_defaults(config: dict, m: int) -> dict:
    """An explicit config, completed: BLOCK_M from M (<= 4 rows for the FMA path), split 1."""
    bm = min(4, m_bucket(m)) if config.get("MODE") == 0 else block_m_for(m)  # FMA_SLICES: <= 4 rows
    return {**dict(BLOCK_M=bm, num_warps=4, num_stages=3, SPLIT_K=1), **config}


_COUNTERS: dict = {}  # device -> int32 zeros: one arrival counter per output tile (SPLIT_MODE 2)
_N_COUNTERS = 1 << 17


def _counters(device):
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def launch_splitk(kernel, x2, n, bias, cfg, k_tiles_total, args, **constexprs):
    """Run `kernel` over grid (N blocks, SPLIT_K, M blocks). With SPLIT_K > 1 the last split of
    each tile reduces in the same launch (SPLIT_MODE 2), or, with cfg["REDUCE"] == "kernel" or
    more tiles than counters, a second kernel does (SPLIT_MODE 1). The counters are shared: run
    these kernels on one stream at a time per device."""
    m = x2.shape[0]
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    k_tiles = triton.cdiv(k_tiles_total, bk)
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    if split == 1:
        mode, part, cnt = 0, out, out
    else:
        part = torch.empty((split, m, n), device=x2.device, dtype=torch.float32)
        in_kernel = cfg.get("REDUCE", "last_split") == "last_split" and grid[0] * grid[2] <= _N_COUNTERS
        mode, cnt = (2, _counters(x2.device)) if in_kernel else (1, part)
    kernel[grid](*args, bias if bias is not None else x2, out, part, cnt, m, n, tiles_per_split * bk, split,
                 HAS_BIAS=bias is not None, SPLIT_MODE=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **constexprs)
    if mode == 1:
        splitk_reduce(part, bias, out)
    return out


def as_2d(x: torch.Tensor):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 activations: full-precision dot (a correctness path); bf16/fp16: the tensor cores.

    "upcast": Triton 3.6's interpreter computes bf16 tl.dot wrongly, so under TRITON_INTERPRET
    the bf16 operands (already rounded to bf16) are multiplied in fp32: the same math.
    """
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpret_mode():
        return "upcast"
    return None


