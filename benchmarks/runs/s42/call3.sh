#!/bin/bash
# For the forty-second session, call 3 (the forty-first session's call 3, never started): base-only at the new default of 384 running
# sequences, S1 at 60 s, for issue 22's ratio against jslora at 384 on the same kind of card (the forty-first session's calls 1-2 on an
# H100; call 2 here on an H200).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=190000; [[ "$card" == *H200* ]] && pages=420880
OUT=$O/s1_base384 timeout 195 python -m jslora.cli bench --setting S1 --num-adapters 2000 --rate 50 --duration 60 \
  --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages $pages --no-reference-step --no-plots --no-progress \
  --compile-threads 8 --systems base-only --max-num-seqs 384 > $O/s1_base384.log 2>&1; tail -n 4 $O/s1_base384.log
