"""EXPERIMENT (branch wgmma, session 9): is the per-stage proxy fence what holds the wgmma kernel at
~2 us per pipeline stage? Times gate+up (24576 x 4096, G = 128, random int4 weights) with and without
fence.proxy.async (bit 1 of the binding's ov argument), 3 weight copies round-robin (> L2).

    python -m quasar_kernels.exp_wgmma_fence
    ncu --nvtx --nvtx-include "profile/" -k regex:wgmma --clock-control none --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section SchedulerStats --section SourceCounters \
        --section MemoryWorkloadAnalysis python -m quasar_kernels.exp_wgmma_fence profile
"""
import sys

import torch

from quasar_bench.packing import pack_int4, quantize_int4_rtn
from quasar_kernels import w4a16_cuda as wc
from quasar_kernels.splitk import graph_time_us


def main():
    n, k, g = 24576, 4096, 128
    packs = []
    for seed in range(3):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
        codes, scales, zeros = quantize_int4_rtn(w.cuda(), g)
        packs.append(wc.prepack_w4a16(pack_int4(codes), scales, zeros, k, g))
    if sys.argv[1:] == ["profile"]:  # one launch each inside an NVTX range, for ncu
        for m, cfg in ((64, dict(S=1, tb=64, nw=1, ov=0)), (128, dict(S=1, tb=128, nw=2, ov=1))):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wc.w4a16_wgmma_linear(x, packs[0], config=cfg)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("profile")
            wc.w4a16_wgmma_linear(x, packs[1], config=cfg)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            print(m, cfg, flush=True)
        return
    print("m nw S ov fence us rel_err_vs_mma_sync", flush=True)
    for m in (16, 64, 128):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = wc.w4a16_cuda_linear(x, packs[0]).float()
        tb = wc.wgmma_tokens_per_cta(m)
        for nw in (1, 2):
            for S in (1, 2, 4):
                for ov in (0, 1):
                    for fence in (0, 2):
                        cfg = dict(S=S, tb=tb, nw=nw, ov=ov | fence)
                        got = wc.w4a16_wgmma_linear(x, packs[0], config=cfg).float()
                        err = ((got - want).norm() / want.norm()).item()
                        t = graph_time_us([lambda p=p, c=cfg: wc.w4a16_wgmma_linear(x, p, config=c) for p in packs],
                                          calls=12, replays=5)
                        print(m, nw, S, ov, "off" if fence else "on", f"{t:.1f}", f"{err:.1e}", flush=True)


if __name__ == "__main__":
    main()
