"""Profile the W4A16 wgmma kernel under ncu: one launch per configuration inside an NVTX range
"profile" (gate+up, 24576 x 4096, G = 128, random int4 weights), after a warm-up launch.

    ncu --nvtx --nvtx-include "profile/" -k regex:wgmma --clock-control none --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --section SchedulerStats --section SourceCounters \\
        --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio,smsp__inst_executed.sum \\
        python -m quasar_kernels.profile_wgmma
"""
import torch

from quasar_bench.packing import pack_int4, quantize_int4_rtn
from quasar_kernels import w4a16_cuda as wc

CONFIGS = ((64, dict(ctas=192, tb=64, nw=1)), (64, dict(ctas=264, tb=64, nw=1)))  # a CTA per block; one wave


def main():
    n, k, g = 24576, 4096, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
    codes, scales, zeros = quantize_int4_rtn(w.cuda(), g)
    packed = wc.prepack_w4a16(pack_int4(codes), scales, zeros, k, g)
    for m, cfg in CONFIGS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wc.w4a16_wgmma_linear(x, packed, config=cfg)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        wc.w4a16_wgmma_linear(x, packed, config=cfg)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(m, cfg, flush=True)


if __name__ == "__main__":
    main()
