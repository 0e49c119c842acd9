#!/bin/bash
# Session 23: the int8 verifier with real acceptance (left out of call 1 to fit one call), with the bf16
# reference timed again in the same call: the table pools one code version's cells only, so int8 cannot
# be joined to call 1's bf16 rows. Same grid as call1.sh otherwise (packed forwards; ar / ngram / lookahead
# replaying results/batch_replay_source; B in {1, 4, 16, 32}). Carried as in call1.sh. Extra arguments are
# passed on as overrides (session 23, with little device time left: `bash call2.sh "batch_size=[1,32]"`).
# Predicted before the call (int8 x bf16 with the same drafter; from the synthetic grid at the same verify
# rows M): ar 1.54 / 1.46 / 1.47 / 1.27 at B = 1 / 4 / 16 / 32; ngram (M ~ 3.5 / 19 / 57 / 87) 1.52 / 1.35 /
# 1.07 / 0.93; lookahead (M ~ 3.6 / 20 / 62 / 94) 1.50 / 1.33 / 1.05 / 0.92. bf16 throughput within +-3 % of call 1.
# Session 23 had ~4 minutes of device time left for it: run with "batch_size=[1,32]" under QB_TIMEOUT=140, then
# resumed under 75 s on the warm machine, it timed 6 of the 12 cells (the visits are shuffled), no pair of int8
# and bf16 with one drafter among them; the rows were not kept.
# Session 24 (H100): `QB_TIMEOUT=520 bash call2.sh` ran whole in 171 s (-> int8/), then
# `rm -rf /tmp/qb_s23_replay_int8 && QB_TIMEOUT=300 bash call2.sh` on the same warm machine, its $OUT/s23 moved to
# $OUT/s24rep (-> int8_rep/); joined as two repeats into int8_pair/ (command in its .md; results/gpu/batch_notes.md).
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/s23/replay_int8; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $o/gpu.txt
timeout -s TERM ${QB_TIMEOUT:-540} python experiments/gpu_speed.py --experiment gpu_batch_replay --packed \
    --source results/batch_replay_source --out $o --runs /tmp/qb_s23_replay_int8 \
    model.tokenizer=.gpu_tok dataset.path=.gpu_data/question.jsonl progress=false \
    "matrix.verifiers=[reference,int8]" "$@" > $o/log.txt 2>&1
echo "rc $?" | tee -a $o/log.txt
ls $o; tail -c 2500 $o/log.txt
