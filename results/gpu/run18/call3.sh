#!/bin/bash
# Run 18, call 3 (session 19): what the per-stage proxy fence costs: the shipped loop (base) against the
# same loop without it (nofence_unsafe; timing only), down and gate+up, M = 64 / 128, 9 interleaved rounds.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run18; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu3.txt
timeout 200 python -m quasar_kernels.microbench.wgmma_ablate --variants base,nofence_unsafe --shape down --ms 64,128 --rounds 9 > $o/fence_down.txt 2>&1
grep -v "^built" $o/fence_down.txt
timeout 150 python -m quasar_kernels.microbench.wgmma_ablate --variants base,nofence_unsafe --ms 64,128 --rounds 9 > $o/fence_gateup.txt 2>&1
grep -v "^built" $o/fence_gateup.txt
