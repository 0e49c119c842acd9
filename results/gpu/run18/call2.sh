#!/bin/bash
# Ran at commit 4fa3ab2: the previous loader (QB_WG_LEAN=0, variant / staging build `loader0`) was removed after
# this run; check out that commit to repeat the A/B.
# Run 18, call 2 (session 19): the kernel table with the lean loader (shipped build) and with the previous
# loader (QUASAR_WGMMA_STAGING=loader0, i.e. -DQB_WG_LEAN=0), same machine, planner choosing each; then
# down at M = 64 / 128 once more, 15 interleaved rounds (call 1's 5 rounds spread 23.5-32.6 µs on down).
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run18; mkdir -p $o
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $o/gpu2.txt
args="--budget 100 --replays 5 --ms 64,128 --shapes gate+up,down,qkv,q/o --kernels bf16_cublas,w4a16_wgmma"
timeout 200 python -m quasar_kernels.bench_w4a16_cuda --out $o/bench_lean $args > $o/bench_lean_log.txt 2>&1; echo "rc $?" >> $o/bench_lean_log.txt
QUASAR_WGMMA_STAGING=loader0 timeout 200 python -m quasar_kernels.bench_w4a16_cuda --out $o/bench_loader0 $args > $o/bench_loader0_log.txt 2>&1; echo "rc $?" >> $o/bench_loader0_log.txt
for b in lean loader0; do echo "== $b"; sed -n '/Speedup over cuBLAS/,/^## Fraction/p' $o/bench_$b/w4a16_cuda.md | grep wgmma; sed -n '/## Time/,/^## Targets/p' $o/bench_$b/w4a16_cuda.md | grep -E "wgmma|cublas"; done
timeout 150 python -m quasar_kernels.microbench.wgmma_ablate --variants base,loader0 --shape down --ms 64,128 --rounds 15 > $o/ablate_down15.txt 2>&1
grep -v "^built" $o/ablate_down15.txt
