#!/bin/bash
# Run 20, call 2 (session 22): programmatic dependent launch (QB_WG_PDL, staging build `pdl`) timed.
# 1) the kernel table twice on one machine, shipped build then QUASAR_WGMMA_STAGING=pdl, run 18's arguments
#    (graph replays of >= 24 back-to-back calls: a "per call in a chain" time for pdl, which cuBLAS does not get);
# 2) wgmma_ablate base vs pdl on down, interleaved in one process (eager back-to-back launches, CUDA events);
# 3) bit-for-bit equality of the pdl build against the shipped one (--check).
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run20; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $o/gpu2.txt
args="--budget 100 --replays 5 --ms 64,128 --shapes gate+up,down,qkv,q/o --kernels bf16_cublas,w4a16_wgmma"
timeout 170 python -m quasar_kernels.bench_w4a16_cuda --out $o/bench_shipped $args > $o/bench_shipped_log.txt 2>&1; echo "rc $?" >> $o/bench_shipped_log.txt
QUASAR_WGMMA_STAGING=pdl timeout 170 python -m quasar_kernels.bench_w4a16_cuda --out $o/bench_pdl $args > $o/bench_pdl_log.txt 2>&1; echo "rc $?" >> $o/bench_pdl_log.txt
for b in shipped pdl; do echo "== $b"; tail -1 $o/bench_${b}_log.txt; sed -n '/Speedup over cuBLAS/,/^## Fraction/p' $o/bench_$b/w4a16_cuda.md | grep wgmma; sed -n '/## Time/,/^## Targets/p' $o/bench_$b/w4a16_cuda.md | grep -E "wgmma|cublas"; done
timeout 120 python -m quasar_kernels.microbench.wgmma_ablate --variants base,pdl --shape down --ms 64,128 --rounds 7 > $o/ablate_down.txt 2>&1; echo "rc $?" >> $o/ablate_down.txt
grep -v "^built" $o/ablate_down.txt | tail -25
timeout 110 python -m quasar_kernels.microbench.wgmma_ablate --check --variants pdl > $o/check.txt 2>&1; echo "rc $?" >> $o/check.txt
tail -3 $o/check.txt
