#!/bin/bash
# The next GPU session's first call (written in the thirty-ninth session, which had no GPU; it replaces
# runs/s38/next_call.sh). Both cards: S1 at 60 s, jslora, FP8 cache, n = 2000, with and without cutting a step's
# last chunk to fit its bucket (--fit-chunks-from 256; the simulator's H100 model says +3.3%).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=190000; [[ "$card" == *H200* ]] && pages=420880
for v in fit off; do
  OUT=$O/s1_$v timeout $([ $v = fit ] && echo 270 || echo 220) python -m jslora.cli bench --setting S1 --systems jslora --num-adapters 2000 \
    --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages $pages \
    --no-reference-step --no-plots --no-progress $([ $v = fit ] && echo --fit-chunks-from 256) > $O/s1_$v.log 2>&1
  tail -4 $O/s1_$v.log
done
