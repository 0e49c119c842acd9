#!/bin/bash
# Run 19, call 4 (session 20): the anatomy of the loop's skeleton on down: when each CTA starts and ends
# (%globaltimer) for the shipped build and for noload_nodeq (no copies after the prologue, no
# dequantization: wgmma chain, stage frame, split-K hand-over only). Each build is its own process.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run19; mkdir -p $o
timeout 240 python -m quasar_kernels.microbench.wgmma_ablate --times base --shape down --ms 64,128 > $o/times_base_down.txt 2>&1 &
b=$!
timeout 240 python -m quasar_kernels.microbench.wgmma_ablate --times noload_nodeq --shape down --ms 64,128 > $o/times_skel_down.txt 2>&1
wait $b
grep -v "^built" $o/times_base_down.txt | grep -v arn
grep -v "^built" $o/times_skel_down.txt | grep -v arn
