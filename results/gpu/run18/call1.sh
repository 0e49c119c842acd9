#!/bin/bash
# Ran at commit 2754c6b: the previous loader (QB_WG_LEAN=0, variant / staging build `loader0`) was removed after
# this run; check out that commit to repeat the A/B.
# Run 18, call 1 (session 19): GPU tests of the wgmma kernel with the lean loader (QB_WG_LEAN, default),
# then the lean loader (base) against the previous one (loader0) on down and gate+up, interleaved in one
# process, then bit-for-bit equality of the two builds.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run18; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu.txt
timeout 200 python -m pytest -q -x tests/test_w4a16_cuda.py -k "wgmma or probe" > $o/gpu_tests.txt 2>&1; echo "rc $?" >> $o/gpu_tests.txt
tail -3 $o/gpu_tests.txt
timeout 170 python -m quasar_kernels.microbench.wgmma_ablate --variants base,loader0 --shape down --ms 64,128 --rounds 5 > $o/ablate_down.txt 2>&1
grep -v "^built" $o/ablate_down.txt
timeout 120 python -m quasar_kernels.microbench.wgmma_ablate --variants base,loader0 --ms 64,128 --rounds 5 > $o/ablate_gateup.txt 2>&1
grep -v "^built" $o/ablate_gateup.txt
timeout 80 python -m quasar_kernels.microbench.wgmma_ablate --check --variants loader0 > $o/check.txt 2>&1; echo "rc $?" >> $o/check.txt
tail -2 $o/check.txt
