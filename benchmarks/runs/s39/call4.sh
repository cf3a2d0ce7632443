#!/bin/bash
# Thirty-ninth session, call 4 (issue 21): S1 at 60 s, jslora, FP8 cache, n = 2000, chunks cut to fit their bucket
# (the default since this session), bf16 weights and then FP8 weights, on one machine.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=190000; [[ "$card" == *H200* ]] && pages=420880
for q in bf16 fp8; do
  OUT=$O/s1_$q timeout 270 python -m jslora.cli bench --setting S1 --systems jslora --num-adapters 2000 \
    --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages $pages \
    --no-reference-step --no-plots --no-progress --fit-chunks-from 256 --compile-threads 8 \
    $([ $q = fp8 ] && echo --quantization fp8) > $O/s1_$q.log 2>&1
  tail -4 $O/s1_$q.log
done
