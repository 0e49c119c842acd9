#!/bin/bash
# Ran on the code of branch `wgmma-cluster` (d6671dc); main does not carry the cluster split or the (3, 2) / (4, 1) shapes.
# Run 17, call 1 (session 18): GPU tests of the wgmma kernel (cluster split-K, (3, 2) / (4, 1) shapes),
# then ablation timing of the new configurations on down and gate+up at M = 64 / 128.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run17; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu.txt
timeout 280 python -m pytest -q -x tests/test_w4a16_cuda.py -k "wgmma or probe" > $o/gpu_tests.txt 2>&1; echo "rc $?" >> $o/gpu_tests.txt
tail -3 $o/gpu_tests.txt
python -m quasar_kernels.microbench.wgmma_ablate --variants base --shape down --ms 64,128 --rounds 5 > $o/ablate_down.txt 2>&1
cat $o/ablate_down.txt | grep -v "^built"
python -m quasar_kernels.microbench.wgmma_ablate --variants base --ms 64,128 --rounds 5 > $o/ablate_gateup.txt 2>&1
cat $o/ablate_gateup.txt | grep -v "^built"
