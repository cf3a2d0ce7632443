#!/bin/bash
# Thirty-ninth session, call 3: call 1 again in the other order (without the cut first, then with it).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=190000; [[ "$card" == *H200* ]] && pages=420880
for v in off fit; do
  OUT=$O/s1_$v timeout $([ $v = fit ] && echo 220 || echo 270) python -m jslora.cli bench --setting S1 --systems jslora --num-adapters 2000 \
    --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages $pages \
    --no-reference-step --no-plots --no-progress $([ $v = fit ] && echo --fit-chunks-from 256) > $O/s1_$v.log 2>&1
  tail -4 $O/s1_$v.log
done
