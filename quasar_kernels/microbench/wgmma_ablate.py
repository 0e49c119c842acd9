"""Where does the W4A16 wgmma kernel's time go? Builds diagnostic variants of the extension (compile-time
macros in csrc/w4a16_wgmma.cu; the shipped build defines none of them) and times each on gate+up
(24576 x 4096, G = 128) at the given rows, same configuration, CUDA events, 4 weight copies rotated
so the weights come from HBM (200 MB > the 50 MB L2), variants interleaved over rounds:

    base      the shipped kernel
    noload    no copies after the prologue: the stages compute on stale buffers (the memory path removed)
    nomma     copies, waits and barriers only: no dequantization, no wgmma (the compute removed)
    stages8   an 8-deep cp.async pipeline instead of 4 (one CTA per SM fits)
    drain     the loop shipped until run 10b: a wgmma drain at the end of every stage (QB_WG_NODRAIN=0;
              the shipped loop keeps the chain running across stages, drained only before a block's
              output, the loader 2 stages ahead instead of 3)
    drain_noload  both
    asets4    four A register sets per tile and wait_group 3: four wgmmas in flight per warpgroup, not two
              (same products in the same order: exact)
    asets4_noload  both
    noload_nobar   noload without the per-stage proxy fence and CTA barrier: the warpgroups drift apart
              (what the lockstep costs)
    noload_nofence noload with the barrier but without the proxy fence (MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC)
    tma       stages through the copy engine (bulk copies + a 2-D tensor map, one issuing warp per stage,
              mbarrier completion) instead of every thread's cp.async (exact)
    ws        warp-specialized: a producer warp issues those copies as buffers free up, consumers release
              each buffer on a second mbarrier, no per-stage CTA barrier (exact)
    ws_asets4 both (once the consumers never stop, a deeper wgmma queue per warpgroup may pay more than
              asets4's 1-2 % under the barrier)
    nofence_unsafe  the shipped loop without the per-stage proxy fence (MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC)
              but with its copies: what the fence costs (timing only, outputs not guaranteed)
    noxload   the shipped loop without the activation copies (weights and scales still stream from HBM):
              what re-reading the token block from L2 for every column block costs (timing only)
    nowload   the shipped loop without the weight and scale / zero copies (activations still copied)
    late2, late4  the loader's copies issued after the wgmmas of k16 step 1 / 3 of each stage
              instead of between the stage's barrier and its first wgmma (QB_WG_LOAD_AFTER; exact)
    nodeq     no dequantization: each step's A fragments are the packed words and scale / zero registers
              as they are (the ALU work of the step removed, its shared loads kept; timing only)
    noload_nodeq  both noload and nodeq: the wgmma chain with the stage frame and nothing else
    pdl       the shipped loop under programmatic dependent launch (QB_WG_PDL): each launch's first weight
              copies overlap the previous kernel's end, so back-to-back calls time a chain, not one call
              alone (exact)

Run on a Hopper GPU:  python -m quasar_kernels.microbench.wgmma_ablate [--ms 64,128] [--rounds 7]
`--shape down` times the down projection (4096 x 12288) instead.
Prints one line per (variant, M, config): median µs, spread, x cuBLAS bf16 (timed the same way).
The results are garbage for noload / nomma / nofence_unsafe / noxload / nowload / nodeq (timing only).

`--times VARIANT` builds that variant recording each CTA's start and end (%globaltimer) and SM, launches
every configuration of the shape 8 times and prints, per configuration, the median over the last 5 of:
the span, the last CTA start, the first and median CTA end, and the fraction of SM-time a CTA was resident
(where Nsight Compute's "SM active cycles" falls short of the elapsed time: ramp-up or a tail).

`--check` compares the exact variants' outputs (EXACT: same products, same summation order) with the
shipped build's, bit for bit, over whole and block-crossing splits, two warpgroup widths, token
counts that fill no block, and group sizes 128 and 32 (a stage in one group, and four groups per
stage); it also checks the shipped build against a float32 reference. Exit status 1 on a mismatch.

`--profile VARIANT` instead makes the program for Nsight Compute: it builds that variant and calls
it 8 times per M (128 CTAs of 3 warpgroups, tb 64 / 128: the planner's pick for gate+up since run 10),
timing nothing, e.g. (stall reasons per SASS line of the M = 64 launch; -lineinfo is in the build):

    ncu --clock-control none --kernel-name regex:wgmma --launch-skip 4 --launch-count 1 \
        --section WarpStateStats --section SourceCounters --section SchedulerStats --import-source yes \
        -o $OUT/noload python -m quasar_kernels.microbench.wgmma_ablate --profile noload --ms 64
    ncu --import $OUT/noload.ncu-rep --page source --csv --print-source sass > $OUT/noload_sass.csv"""
import argparse
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

VARIANTS = {"base": [], "noload": ["-DQB_ABLATE_NOLOAD"], "nomma": ["-DQB_ABLATE_NOMMA"], "stages8": ["-DQB_WG_STAGES=8"],
            "drain": ["-DQB_WG_NODRAIN=0"], "drain_noload": ["-DQB_WG_NODRAIN=0", "-DQB_ABLATE_NOLOAD"],
            "asets4": ["-DQB_WG_ASETS=4"], "asets4_noload": ["-DQB_WG_ASETS=4", "-DQB_ABLATE_NOLOAD"],
            "noload_nobar": ["-DQB_ABLATE_NOLOAD", "-DQB_ABLATE_NOBAR"],
            "noload_nofence": ["-DQB_ABLATE_NOLOAD", "-DQB_ABLATE_NOFENCE"],
            "tma": ["-DQB_WG_TMA=1"], "ws": ["-DQB_WG_WS=1"], "ws_asets4": ["-DQB_WG_WS=1", "-DQB_WG_ASETS=4"],
            "nofence_unsafe": ["-DQB_ABLATE_NOFENCE", "-DQB_ABLATE_UNSAFE"],
            "noxload": ["-DQB_ABLATE_NOXLOAD"], "nowload": ["-DQB_ABLATE_NOWLOAD"],
            "late2": ["-DQB_WG_LOAD_AFTER=2"], "late4": ["-DQB_WG_LOAD_AFTER=4"],
            "nodeq": ["-DQB_ABLATE_NODEQ"], "noload_nodeq": ["-DQB_ABLATE_NOLOAD", "-DQB_ABLATE_NODEQ"],
            "pdl": ["-DQB_WG_PDL=1"]}
# (N, K) of the Qwen3-8B projections the tool times, the configurations it times on each, and the one it
# profiles (the planner's pick on both Hopper boards since run 10 / run 14)
SHAPES = {"gate+up": (24576, 4096), "down": (4096, 12288)}
CONFIGS = {  # gate+up: 3 warpgroups make 128 whole blocks; down: 32 blocks of 128 rows x 96 stages, split
    "gate+up": lambda tb: ([dict(ctas=c, tb=tb, nw=1) for c in (132, 192, 264)]
                           + [dict(ctas=c, tb=tb, nw=2) for c in (96, 132)]
                           + [dict(ctas=c, tb=tb, nw=1, wg=3) for c in (128, 132)]),
    "down": lambda tb: ([dict(ctas=c, tb=tb, nw=1) for c in (128, 132, 256, 264)]
                        + [dict(ctas=c, tb=tb, nw=1, wg=3) for c in (132, 264)]
                        + [dict(ctas=128, tb=tb, nw=2)]),  # 16 blocks of 256 rows: half the activation re-reads
}
PROFILED = {"gate+up": lambda tb: dict(ctas=128, tb=tb, nw=1, wg=3),
            "down": lambda tb: dict(ctas=256 if tb == 64 else 128, tb=tb, nw=1)}
# variants that compute what the shipped kernel computes, in the same order: outputs bit for bit equal
EXACT = ("drain", "stages8", "asets4", "tma", "ws", "ws_asets4", "late2", "late4", "pdl")


def build(variant: str, times: bool = False):
    from torch.utils.cpp_extension import load

    from quasar_kernels import w4a16_cuda as wc

    name = variant + ("_times" if times else "")
    d = wc._build_dir().parent / f"w4a16_ablate_{name}"
    d.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    flags = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]
    return load(name=f"quasar_w4a16_ablate_{name}", sources=[str(s) for s in wc._SOURCES],
                extra_cuda_cflags=flags + VARIANTS[variant] + (["-DQB_CTA_TIMES=1"] if times else []),
                extra_cflags=["-O3"], build_directory=str(d))


def cta_times_summary(times, n_sms: int) -> dict:
    """One launch's per-CTA rows (start ns, end ns, SM id) -> how the SMs spent the launch: span (first
    start to last end), when CTAs started and ended (µs after the first start: the last start, the first
    and the median end), the timer's finest step seen, and the fraction of SM-time some CTA was resident (union of each SM's CTA intervals
    over n_sms x span; SMs that ran no CTA count as idle)."""
    rows = sorted((int(a), int(b), int(c)) for a, b, c in times)
    t0 = min(r[0] for r in rows)
    span = max(r[1] for r in rows) - t0
    busy = 0
    for sm in {r[2] for r in rows}:
        cur_s = cur_e = None
        for a, b, _ in (r for r in rows if r[2] == sm):  # sorted by start: merge overlapping intervals
            if cur_e is None or a > cur_e:
                busy += 0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = a, b
            else:
                cur_e = max(cur_e, b)
        busy += cur_e - cur_s
    ends = sorted(r[1] - t0 for r in rows)
    stamps = sorted({t for r in rows for t in r[:2]})
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tick_ns": min(steps) if steps else float("nan"),  # the timer's resolution, at best
            "span_us": span / 1e3, "last_start_us": (max(r[0] for r in rows) - t0) / 1e3,
            "first_end_us": ends[0] / 1e3, "median_end_us": statistics.median(ends) / 1e3,
            "sm_busy": busy / (n_sms * span) if span > 0 else float("nan")}


def _build_in_child(variant: str) -> str:
    build(variant)
    return variant


def timed(fn, reps: int) -> float:
    """µs per call: CUDA events around reps calls (after the caller's warm-up)."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="64,128")
    ap.add_argument("--shape", choices=list(SHAPES), default="gate+up",
                    help="Qwen3-8B projection to time (down: few column blocks, long K, split across CTAs)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    mode = ap.add_mutually_exclusive_group()  # one thing per run: time, profile, record CTA times, or check
    mode.add_argument("--profile", choices=list(VARIANTS), default=None,
                      help="build this variant and run it for a profiler (8 calls per M, nothing timed)")
    mode.add_argument("--times", choices=list(VARIANTS), default=None,
                      help="build this variant recording each CTA's start / end time and SM (the CTAs of the "
                           "first token block), and print how busy the SMs were per configuration (median of 5 "
                           "launches)")
    mode.add_argument("--check", action="store_true",
                      help="compare the exact variants with the shipped build bit for bit (no timing)")
    args = ap.parse_args(argv)
    if args.check:
        return check([v for v in args.variants.split(",") if v in EXACT])
    variants = [args.profile or args.times] if (args.profile or args.times) else args.variants.split(",")
    if not (args.profile or args.times):  # built side by side in child processes; a profiler wants one process
        with ProcessPoolExecutor(len(variants), mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            for v in pool.map(_build_in_child, variants):
                print("built", v, flush=True)
    exts = {v: build(v, times=bool(args.times)) for v in variants}

    from quasar_bench.packing import pack_int4, quantize_int4_rtn
    from quasar_kernels import w4a16_cuda as wc

    n, k = SHAPES[args.shape]
    g = 128
    gen = torch.Generator().manual_seed(0)
    packs = []
    for _ in range(4):
        codes, scales, zeros = quantize_int4_rtn((torch.randn(n, k, generator=gen) * 0.05).cuda(), g)
        packs.append(wc.prepack_w4a16(pack_int4(codes), scales, zeros, k, g))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(4)]
    print(torch.cuda.get_device_name(), torch.__version__, torch.version.cuda, flush=True)
    for m in [int(s) for s in args.ms.split(",")]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        tb = 64 if m <= 64 else 128
        if args.profile:
            wc._EXT = exts[args.profile]
            cfg = PROFILED[args.shape](tb)
            for i in range(8):
                wc.w4a16_wgmma_linear(x, packs[i % 4], config=cfg)
            torch.cuda.synchronize()
            print(f"M={m}: 8 calls of {args.profile} on {args.shape} ({cfg})", flush=True)
            continue
        cfgs = CONFIGS[args.shape](tb)
        if args.times:
            wc._EXT = exts[args.times]
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for cfg in cfgs:
                runs = []
                for i in range(8):  # 3 warm-up launches, then 5 read back one by one
                    wc.w4a16_wgmma_linear(x, packs[i % 4], config=cfg)
                    torch.cuda.synchronize()
                    if i >= 3:
                        runs.append(cta_times_summary(wc._EXT.wgmma_cta_times(cfg["ctas"]).tolist(), sms))
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(f"M={m} {args.times} ctas={cfg['ctas']:3d} tb={cfg['tb']} nw={cfg['nw']} wg={cfg.get('wg', 2)}  "
                      f"span {med['span_us']:5.1f} us, last start {med['last_start_us']:4.1f}, ends first / median "
                      f"{med['first_end_us']:4.1f} / {med['median_end_us']:4.1f}, SMs busy {med['sm_busy']:.0%} "
                      f"(timer step <= {med['tick_ns']:.0f} ns)", flush=True)
            continue
        cells = [(v, tuple(c.items())) for v in variants for c in cfgs]
        times = {cell: [] for cell in cells}
        cublas = []
        it = [0]

        def call(v, cfg):
            def f():
                wc._EXT = exts[v]
                wc.w4a16_wgmma_linear(x, packs[it[0] % 4], config=cfg)
                it[0] += 1
            return f

        def mm():
            torch.matmul(x, dense[it[0] % 4].t())
            it[0] += 1

        for r in range(args.rounds + 1):  # round 0: warm-up, not kept
            t = timed(mm, args.reps)
            if r:
                cublas.append(t)
            for v, cfg in list(cells):
                try:
                    t = timed(call(v, dict(cfg)), args.reps)
                except Exception as e:  # noqa: BLE001 - a config a variant cannot launch: say so, go on
                    print(f"M={m} {v} {cfg}: {e}", flush=True)
                    times.pop((v, cfg), None)
                    cells.remove((v, cfg))
                    continue
                if r:
                    times[(v, cfg)].append(t)
        cb = statistics.median(cublas)
        print(f"M={m} cublas_bf16 {cb:.1f} us [{min(cublas):.1f}, {max(cublas):.1f}]", flush=True)
        for (v, cfg), ts in times.items():
            cfg = dict(cfg)
            med = statistics.median(ts)
            print(f"M={m} {v:8s} ctas={cfg['ctas']:3d} tb={cfg['tb']} nw={cfg['nw']} wg={cfg.get('wg', 2)}  {med:7.1f} us "
                  f"[{min(ts):.1f}, {max(ts):.1f}]  {cb / med:.2f}x cublas", flush=True)


def check(variants) -> int:
    """Bit-for-bit equality of each exact variant with the shipped build (see the module doc)."""
    from quasar_bench.packing import dequantize_int4, pack_int4, quantize_int4_rtn
    from quasar_kernels import w4a16_cuda as wc

    exts = {v: build(v) for v in ["base", *variants]}
    gen = torch.Generator().manual_seed(1)
    bad = 0
    for n, k, g in ((24576, 4096, 128), (4096, 4096, 32), (1000, 2048, 128)):
        w = (torch.randn(n, k, generator=gen) * 0.05).cuda()
        codes, scales, zeros = quantize_int4_rtn(w, g)
        qweight = pack_int4(codes)
        packed = wc.prepack_w4a16(qweight, scales, zeros, k, g)
        deq = dequantize_int4(qweight, scales, zeros, k, g)
        for m in (64, 50, 128, 17):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tb = 64 if m <= 64 else 128
            blocks = -(-n // 128)
            whole = {}  # (wg, nw) -> the shipped build's output with whole blocks
            for cfg in (dict(ctas=blocks, tb=tb, nw=1), dict(ctas=132, tb=tb, nw=1), dict(ctas=2 * blocks + 5, tb=tb, nw=1),
                        dict(ctas=-(-blocks // 2), tb=tb, nw=2), dict(ctas=132, tb=tb, nw=2),
                        dict(ctas=-(-n // 192), tb=tb, nw=1, wg=3), dict(ctas=132, tb=tb, nw=1, wg=3)):
                outs = {}
                for v in ["base", *variants]:
                    wc._EXT = exts[v]
                    try:
                        outs[v] = wc.w4a16_wgmma_linear(x, packed, config=cfg).float()
                    except Exception as e:  # noqa: BLE001 - a config a variant cannot launch: say so
                        outs[v] = e
                if isinstance(outs["base"], Exception):
                    print(f"n={n} k={k} g={g} m={m} {cfg}: base cannot launch ({outs['base']})", flush=True)
                    continue
                ref = x.float() @ deq.t()
                err = ((outs["base"] - ref).norm() / ref.norm()).item()
                line = [f"n={n} k={k} g={g} m={m} ctas={cfg['ctas']} nw={cfg['nw']} wg={cfg.get('wg', 2)}: "
                        f"base rel err {err:.1e}"]
                bad += err > 1e-2
                if cfg["ctas"] in (blocks, -(-blocks // 2), -(-n // 192)):  # whole blocks: same sums whatever the CTA shape
                    whole[(cfg.get("wg", 2), cfg["nw"])] = outs["base"]
                    if len(whole) > 1:
                        same = all(torch.equal(o, whole[(2, 1)]) for o in whole.values())
                        bad += not same
                        line.append(f"whole blocks {'equal' if same else 'DIFFER'} across CTA shapes")
                for v in variants:
                    o = outs[v]
                    same = not isinstance(o, Exception) and torch.equal(o, outs["base"])
                    bad += not same
                    line.append(f"{v} {'equal' if same else 'DIFFERS' if not isinstance(o, Exception) else o}")
                print("; ".join(line), flush=True)
    print("check:", "all equal" if not bad else f"{bad} mismatches", flush=True)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
