#!/bin/bash
# Session 24: the whole synthetic batch grid (experiment=gpu_batch) timed twice in one code version, so that
# every cell -- int8 and W8A8 included, which session 21's table timed once -- gets two repeats, each paired
# with bf16's same repeat. Four calls on one warm machine, A B A B:
#   bash call.sh ref_int4 "[reference,int4]";  bash call.sh int8_w8a8 "[int8,w8a8]"
#   bash call.sh ref_int4_rep "[reference,int4]";  bash call.sh int8_w8a8_rep "[int8,w8a8]"
# Each call's $OUT/s24/<tag>/ was copied to results/gpu/batch_h100/s24/<tag>/; then, here: python
# experiments/gpu_speed.py --experiment gpu_batch --from-rows <the four s24/*/batch_rows.csv, in that order>
# --out results/gpu/batch_h100 (the _rep files become repeat 1; the exact line is in batch.md).
# Ran in session 24 as above (271 / 353 / 197 / 241 s); measured against the prediction: results/gpu/batch_notes.md.
# If the timeout stops a call, the same command on the warm machine resumes its store.
# Carried (git-ignored): .gpu_site (hydra-core, omegaconf, antlr4, pydantic, unzipped), .gpu_tok (SmolLM2
# tokenizer files), .gpu_data/question.jsonl (Spec-Bench's questions).
# Predicted before the calls (from session 21's table, results/gpu/batch_h100/batch.md, and the spread of its
# repeats, median 2 %, at most 6.6 %): every speedup within +-4 % of session 21's (int4 x bf16 with ar 1.77 ->
# 1.56 from B = 1 to 32; int8 x bf16 with synthetic_a0.8_k5 1.52 -> 0.70; W8A8 with synthetic_a0.8_k5 1.40 ->
# 1.00); bf16 throughput within +-4 % (board to board); the crossover list unchanged except cells within ~4 %
# of 1 (W8A8 a0.8_k5 at B = 32, int4 a0.8_k5 at B = 32), which may turn into ties.
set -u
tag=$1; verifiers=$2
export PYTHONPATH=$PWD/.gpu_site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
o=$OUT/s24/$tag; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $o/gpu.txt
timeout -s TERM ${QB_TIMEOUT:-560} python experiments/gpu_speed.py --experiment gpu_batch --out $o --runs /tmp/qb_s24_$tag \
    model.tokenizer=.gpu_tok dataset.path=.gpu_data/question.jsonl progress=false \
    "matrix.verifiers=$verifiers" > $o/log.txt 2>&1
echo "rc $?" | tee -a $o/log.txt
grep -E "wall|error|Error" $o/log.txt | tail -3; ls $o
