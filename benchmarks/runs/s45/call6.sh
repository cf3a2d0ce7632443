#!/bin/bash
# For the forty-fifth session, call 6, either card (~280 s; failed starts left 580 s of device time): S1 at 60 s
# (issue 22; n = 2000, FP8 cache, 384 running sequences) with the step as it is now (without XLA's
# rematerialization pass).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=$([[ "$card" == *H200* ]] && echo 420880 || echo 190000)
OUT=$O/s1 timeout 270 python -m jslora.cli bench --setting S1 --num-adapters 2000 --rate 50 --duration 60 --preload \
  --host-adapter-gb 48 --kv-cache-dtype fp8 --no-reference-step --no-plots --no-progress --compile-threads 8 \
  --systems jslora --num-pages $pages > $O/s1.log 2>&1
echo "== S1: $(grep -c "Can't reduce" $O/s1.log) rematerialization lines"; tail -n 6 $O/s1.log
