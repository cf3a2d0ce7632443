#!/bin/bash
# For the forty-fifth session, call 2, either card (~600 s), if call 1 shows fewer GEMM launches without the pass:
# S1 at 60 s (issue 22; jslora n = 2000, FP8 cache, 384 running sequences) with and without XLA's
# rematerialization pass, in both orders' first half (the pair's order swapped in a later call).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=$([[ "$card" == *H200* ]] && echo 420880 || echo 190000)
S1="--setting S1 --num-adapters 2000 --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8 --systems jslora --num-pages $pages"
for run in "noremat --no-xla-rematerialization" "default"; do
  set -- $run; name=$1; shift
  OUT=$O/s1_$name timeout 285 python -m jslora.cli bench $S1 "$@" > $O/s1_$name.log 2>&1
  echo "== $name"; tail -n 4 $O/s1_$name.log
done
