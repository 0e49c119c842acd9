"""One launch of our W4A16 CUDA kernel per (shape, M, ring) for Nsight Compute to profile.

    ncu --nvtx --nvtx-include "profile/" -k regex:w4a16 --clock-control none \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python experiments/ncu_w4a16.py --shapes lm_head,gate+up,q/o --ms 1 --pipes 0,1

Launch configurations come from the planner (tuned ones from the on-disk cache when the
benchmark ran before on this machine; the cost model's otherwise, since nothing is timed here:
QUASAR_KERNEL_AUTOTUNE=0 keeps the autotuner's many launches out of the profile). Only the
launches inside the NVTX range "profile" are meant to be profiled, one per combination, after a
warm-up call (weights in HBM: the L2 is flushed before each).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("QUASAR_KERNEL_AUTOTUNE", "0")

from quasar_bench.packing import pack_int4, quantize_int4_rtn  # noqa: E402
from quasar_kernels import w4a16_cuda as wc  # noqa: E402
from quasar_kernels.bench_w4a16_cuda import SHAPES  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="lm_head,gate+up,q/o")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--pipes", default="0,1")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device=dev)
    torch.manual_seed(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        codes, scales, zeros = quantize_int4_rtn(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, 128)
        packed = wc.prepack_w4a16(pack_int4(codes), scales, zeros, k, 128)
        del codes
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for pipe in (int(v) for v in args.pipes.split(",")):
                cfg = wc.plan(m, packed, dev, pipe=pipe)
                wc.w4a16_cuda_linear(x, packed, config=cfg)  # warm-up (workspace, module load)
                flush.zero_()
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_push("profile")
                wc.w4a16_cuda_linear(x, packed, config=cfg)
                torch.cuda.nvtx.range_pop()
                torch.cuda.synchronize()
                print(f"{name} M={m} pipe={pipe}: {cfg}", flush=True)


if __name__ == "__main__":
    main()
