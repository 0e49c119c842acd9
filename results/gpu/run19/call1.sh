#!/bin/bash
# Run 19, call 1 (session 20): how much of the time is the activation re-reads from L2? The shipped loop
# (base) against the same loop without the activation copies (noxload) and without the weight / scale
# copies (nowload), and with no copies at all (noload); timing only. down and gate+up, M = 64 / 128.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu1.txt
timeout 260 python -m quasar_kernels.microbench.wgmma_ablate --variants base,noxload,nowload,noload --shape down --ms 64,128 --rounds 9 > $o/xload_down.txt 2>&1
grep -v "^built" $o/xload_down.txt
timeout 200 python -m quasar_kernels.microbench.wgmma_ablate --variants base,noxload,nowload --ms 64,128 --rounds 7 > $o/xload_gateup.txt 2>&1
grep -v "^built" $o/xload_gateup.txt
