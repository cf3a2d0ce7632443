#!/bin/bash
# Forty-fourth session, call 5, either card (~330 s): issue 17's item 4 at context ~1,024 (the forty-third session's
# call 6 covered ~150): device time of a decode step, no LoRA and 256 distinct r = 16 adapters, Llama-3-8B at batch
# 1 / 32 / 256 and Llama-2-7B at 1 / 32 (its bf16 K/V at batch 256 and context 1,024 is 137 GB: no single GPU lent
# holds it beside the weights). Rows print as they finish, so a timeout keeps the ones done.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
for run in "llama-3-8b 1,32,256 185" "llama-7b 1,32 120"; do
  set -- $run
  OUT=$O/$1 timeout $3 python benchmarks/engine.py --skip-warmup --model $1 --batches $2 --adapters 0,256 \
    --prompt 1000 --steps 16 > $O/$1.log 2>&1
  grep -E "^(adapters|  *none|  *[0-9]+ )" $O/$1.log | tail -n 7
done
