#!/bin/bash
# Run 19, call 5b (session 20, at 7f4aab4, call 5's machine still warm): the same timing again.
# Output: sum_down2.txt.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
timeout 100 python -m quasar_kernels.microbench.wgmma_ablate --variants base,oldsum --shape down --ms 64,128 --rounds 9 > $o/sum_down2.txt 2>&1
