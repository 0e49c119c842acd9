export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH
timeout 200 python -m pytest -q -x tests/test_w4a16_cuda.py -k "wgmma" tests/test_backends.py > $OUT/tests.txt 2>&1; echo tests rc=$?; tail -3 $OUT/tests.txt
timeout 200 python -m quasar_kernels.bench_w4a16_cuda --out $OUT/bench --budget 120 --replays 5 --ms 16,32,64,128,192 --shapes gate+up,down,qkv --kernels bf16_cublas,w4a16_wgmma,w4a16_triton > $OUT/bench_log.txt 2>&1; echo bench rc=$?
grep -A12 "## Time" $OUT/bench/w4a16_cuda.md | head -14
timeout 100 python -m quasar_kernels.bench_w4a16_cuda --out $OUT/bench2 --budget 60 --replays 5 --ms 32,64 --shapes lm_head,q/o --kernels bf16_cublas,w4a16_wgmma,w4a16_triton >> $OUT/bench_log.txt 2>&1; echo bench2 rc=$?
grep -A8 "## Time" $OUT/bench2/w4a16_cuda.md | head -10
rm -f $OUT/bench/*sass* $OUT/bench/*_log.txt $OUT/bench2/*sass* $OUT/bench2/*_log.txt
timeout 120 ncu --nvtx --nvtx-include "profile/" -k regex:wgmma --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio,smsp__inst_executed.sum python -m quasar_kernels.profile_wgmma > $OUT/ncu.txt 2>&1; echo ncu rc=$?
grep -E "inst_executed.sum|Duration|Issue Slots|stalled_(wait|math|not_sel|barrier|long|gmma)" $OUT/ncu.txt
grep "wgmma m=64" $OUT/bench_log.txt
