#!/bin/bash
# Session 21, call 4: real acceptance at batch (experiment=gpu_batch_replay, packed forwards) on one H100
# with today's kernels: verifiers bf16, int4, W8A8 (int8 left out to fit one call), drafters ar / ngram /
# lookahead replaying results/batch_replay_source, B in {1, 4, 16, 32}.
# Carried to the device beside the tree (git-ignored): .gpu_site (hydra-core, omegaconf, antlr4, pydantic with
# pydantic-core's wheel for the device's Python 3.12, annotated_types, typing_inspection, unzipped), .gpu_tok
# (the SmolLM2 tokenizer files from the cache root's smollm2-135m-instruct folder) and .gpu_data/question.jsonl
# (Spec-Bench's questions).
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/s21/replay; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $o/gpu.txt
timeout -s TERM ${QB_TIMEOUT:-540} python experiments/gpu_speed.py --experiment gpu_batch_replay --packed \
    --source results/batch_replay_source --out $o --runs /tmp/qb_s21_replay \
    model.tokenizer=.gpu_tok dataset.path=.gpu_data/question.jsonl progress=false \
    "matrix.verifiers=[reference,int4,w8a8]" > $o/log.txt 2>&1
echo "rc $?" | tee -a $o/log.txt
ls $o; tail -c 2500 $o/log.txt
