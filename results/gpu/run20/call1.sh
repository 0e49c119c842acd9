#!/bin/bash
# Run 20, call 1 (session 21, the session's last 5 device minutes): the GPU tests of the wgmma kernel built
# with programmatic dependent launch (QB_WG_PDL=1). Eager launches, so every kernel call may start before
# the previous kernel in the stream (the test's own input preparation) has finished: a griddepcontrol.wait
# placed too late would show as wrong outputs.
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1; mkdir -p $OUT/run20
QUASAR_WGMMA_STAGING=pdl timeout 230 python -m pytest -q -x tests/test_w4a16_cuda.py -k "wgmma or probe" 2>&1 | tail -15 | tee $OUT/run20/gpu_tests_pdl.txt
