#!/bin/bash
# Forty-third session, call 6, either card (~500 s): issue 17's item 4 (and 21's) on one machine, as it stands:
# device time of a decode step at context ~150, batch 1 / 32 / 256, no LoRA and 256 distinct r = 16 adapters,
# Llama-3-8B and Llama-2-7B with bf16 weights, then Llama-2-7B with FP8 weights. Rows print as they finish,
# so a timeout keeps the ones done.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
for run in "llama-3-8b bf16 175" "llama-7b bf16 175" "llama-7b fp8 135"; do
  set -- $run
  OUT=$O/$1_$2 timeout $3 python benchmarks/engine.py --skip-warmup --model $1 --batches 1,32,256 --adapters 0,256 \
    --steps 16 $([ $2 = fp8 ] && echo --quantization fp8) > $O/$1_$2.log 2>&1
  grep -E "^(adapters|  *none|  *[0-9]+ )" $O/$1_$2.log | tail -n 5
done
