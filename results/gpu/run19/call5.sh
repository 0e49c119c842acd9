#!/bin/bash
# Run 19, call 5 (session 20): the batched split-K sum (base) against the sum shipped until now (oldsum):
# bit-equality over the check cases, timing on down (the shape whose blocks are split), then the GPU tests
# of the shipped build. Ran at 7f4aab4 (the batched sum and the `oldsum` variant were reverted after it).
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
timeout 200 python -m quasar_kernels.microbench.wgmma_ablate --check --variants oldsum > $o/check_oldsum.txt 2>&1
tail -2 $o/check_oldsum.txt
timeout 120 python -m quasar_kernels.microbench.wgmma_ablate --variants base,oldsum --shape down --ms 64,128 --rounds 11 > $o/sum_down.txt 2>&1
grep -v "^built" $o/sum_down.txt | grep -v arn
timeout 240 python -m pytest -q -x tests/test_w4a16_cuda.py -k "wgmma or probe" > $o/gpu_tests_sum.txt 2>&1
tail -2 $o/gpu_tests_sum.txt
