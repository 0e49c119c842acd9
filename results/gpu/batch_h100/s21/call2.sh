#!/bin/bash
# Session 21, call 2 (ran whole in 367 s; if a timeout stops it, the same command on the warm machine resumes the store): the batch grid
# for the int8 and w8a8 verifiers, experiment=gpu_batch as configured. --runs stays outside
# $OUT (the store writes hundreds of files); rows come back as batch_rows.csv (or *_rows_partial.csv when
# the timeout stops it).
# Without the reference verifier's rows it ends with rc 1 ('the batch table needs the reference verifier's
# rows') after writing batch_rows.csv: the table is built by --from-rows with call 1's rows (README).
# Carried to the device beside the tree (git-ignored): .gpu_site (hydra-core, omegaconf, antlr4, pydantic with
# pydantic-core's wheel for the device's Python 3.12, annotated_types, typing_inspection, unzipped), .gpu_tok
# (the SmolLM2 tokenizer files from the cache root's smollm2-135m-instruct folder) and .gpu_data/question.jsonl
# (Spec-Bench's questions).
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/s21/int8_w8a8; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $o/gpu.txt
timeout -s TERM ${QB_TIMEOUT:-560} python experiments/gpu_speed.py --experiment gpu_batch --out $o --runs /tmp/qb_s21_int8_w8a8 \
    model.tokenizer=.gpu_tok dataset.path=.gpu_data/question.jsonl progress=false \
    "matrix.verifiers=[int8,w8a8]" > $o/log.txt 2>&1
echo "rc $?" | tee -a $o/log.txt
grep -E "cell|wall|error|Error" $o/log.txt | tail -5; ls $o
tail -c 3000 $o/log.txt
