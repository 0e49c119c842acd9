#!/bin/bash
# Run 19, call 2 (session 20): the loader's copies after the wgmmas of step 1 / 3 / 5 of each stage
# (late2 / late4 / late6) against the shipped placement right after the stage's barrier (base):
# bit-equality first, then timing on down and gate+up, M = 64 / 128, interleaved rounds.
# This call timed nothing: its timeouts were too short for building three new variants on a cold machine
# (see call2b.sh for what ran on the same machine next). late6 never built and was later dropped.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu2.txt
timeout 150 python -m quasar_kernels.microbench.wgmma_ablate --check --variants late2,late4,late6 > $o/check_late.txt 2>&1
tail -4 $o/check_late.txt
timeout 200 python -m quasar_kernels.microbench.wgmma_ablate --variants base,late2,late4,late6 --shape down --ms 64,128 --rounds 9 > $o/late_down.txt 2>&1
grep -v "^built" $o/late_down.txt
timeout 180 python -m quasar_kernels.microbench.wgmma_ablate --variants base,late2,late4,late6 --ms 64,128 --rounds 7 > $o/late_gateup.txt 2>&1
grep -v "^built" $o/late_gateup.txt
