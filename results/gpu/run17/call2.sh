#!/bin/bash
# Ran on the code of branch `wgmma-cluster` (d6671dc); main does not carry the cluster split or the (3, 2) / (4, 1) shapes.
# Run 17, call 2 (session 18): the kernel table with the planner choosing among every configuration
# (now with the cluster split-K and the (3, 2) / (4, 1) shapes); tuner log kept.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run17; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu2.txt
python -m quasar_kernels.bench_w4a16_cuda --out $o/bench --budget 100 --replays 5 --ms 64,128 \
  --shapes gate+up,down,qkv,q/o --kernels bf16_cublas,w4a16_wgmma,w4a16_triton > $o/bench_log.txt 2>&1
echo "rc $?" >> $o/bench_log.txt
grep -v "^W4A16 wgmma m=" $o/bench_log.txt | tail -30
