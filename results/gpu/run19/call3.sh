#!/bin/bash
# Run 19, call 3 (session 20): what the dequantization's ALU work costs inside the real loop: nodeq (A =
# the packed words as they are, copies kept) and noload_nodeq (no copies either) against base and noload.
# Timing only. down and gate+up, M = 64 / 128. (Calls 2a-2c of this run: late_*.txt, check_late.txt,
# gpu_tests.txt; commands in NOTES.)
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu3.txt
timeout 420 python -m quasar_kernels.microbench.wgmma_ablate --variants base,noload,nodeq,noload_nodeq --shape down --ms 64,128 --rounds 9 > $o/nodeq_down.txt 2>&1
grep -v "^built" $o/nodeq_down.txt | grep -v arn
timeout 150 python -m quasar_kernels.microbench.wgmma_ablate --variants base,noload,nodeq,noload_nodeq --ms 64,128 --rounds 7 > $o/nodeq_gateup.txt 2>&1
grep -v "^built" $o/nodeq_gateup.txt | grep -v arn
