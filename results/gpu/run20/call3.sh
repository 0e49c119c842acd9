#!/bin/bash
# Run 20, call 3 (written in session 22; not yet run: no device was lent that session): programmatic dependent
# launch end to end. bf16 and the int4 verifier (wgmma kernel) with AR and synthetic alpha 0.8 k 5 at B = 16 / 32,
# once with the shipped build and once with QUASAR_WGMMA_STAGING=pdl (fresh stores). Run it twice on one warm
# machine (`bash call3.sh 0`, then `bash call3.sh 1`: A B A B), then join each build's two row files on this
# machine with --from-rows (the second file's cells become repeat 1: per-repeat ranges), e.g.
#   python experiments/gpu_speed.py --experiment gpu_batch --from-rows <o>/pdl_0/batch_rows.csv <o>/pdl_1/batch_rows.csv --out <o>/pdl
# Carried beside the tree: .gpu_site, .gpu_tok, .gpu_data (see results/gpu/batch_h100/call1.sh).
r=${1:-0}
export PYTHONPATH=$PWD/.gpu_site:$PYTHONPATH PYTHONUNBUFFERED=1
o=$OUT/run20/e2e; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $o/gpu.txt
cells=(model.tokenizer=.gpu_tok dataset.path=.gpu_data/question.jsonl progress=false "matrix.verifiers=[reference,int4]"
       "matrix.drafters=[ar,{name:synthetic,label:synthetic_a0.8_k5,alpha:0.8,k:5,acceptance:forced}]" "batch_size=[16,32]")
for b in shipped pdl; do
  s=""; [ $b = pdl ] && s=pdl
  QUASAR_WGMMA_STAGING=$s timeout -s TERM 280 python experiments/gpu_speed.py --experiment gpu_batch \
      --out $o/${b}_$r --runs /tmp/qb_run20_${b}_$r "${cells[@]}" > $o/${b}_$r.log 2>&1
  echo "$b $r rc $?"; grep -E "^ *int4 " $o/${b}_$r.log | tail -4
done
