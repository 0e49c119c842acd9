#!/bin/bash
# Run 19, calls 2b-2d (session 20), on call 2's machine while still warm (builds of base / late2 / late4
# cached): timing, then --check, then the GPU tests of the shipped build (its .gpu_site carried for omegaconf).
# Outputs: late_down.txt, late_gateup.txt, check_late.txt, gpu_tests.txt.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
timeout 250 python -m quasar_kernels.microbench.wgmma_ablate --variants base,late2,late4 --shape down --ms 64,128 --rounds 9 > $o/late_down.txt 2>&1
timeout 200 python -m quasar_kernels.microbench.wgmma_ablate --variants base,late2,late4 --ms 64,128 --rounds 7 > $o/late_gateup.txt 2>&1
timeout 200 python -m quasar_kernels.microbench.wgmma_ablate --check --variants late2,late4 > $o/check_late.txt 2>&1
timeout 480 python -m pytest -q -x tests/test_w4a16_cuda.py -k "wgmma or probe" > $o/gpu_tests.txt 2>&1
