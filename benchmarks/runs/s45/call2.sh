#!/bin/bash
# For the forty-fifth session, call 2, either card (~600 s): S1 at 60 s (issue 22; jslora n = 2000, FP8 cache, 384
# running sequences) without XLA's rematerialization pass (the default since call 1: Llama-3-8B batch 32 ran 129
# GEMM launches, 6.39 ms, against 191, 7.79 ms, with it) and with it (--xla-rematerialization).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
pages=$([[ "$card" == *H200* ]] && echo 420880 || echo 190000)
S1="--setting S1 --num-adapters 2000 --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8 --systems jslora --num-pages $pages"
for run in "noremat" "remat --xla-rematerialization"; do
  set -- $run; name=$1; shift
  OUT=$O/s1_$name timeout 285 python -m jslora.cli bench $S1 "$@" > $O/s1_$name.log 2>&1
  echo "== $name: $(grep -c "Can't reduce" $O/s1_$name.log) rematerialization lines"; tail -n 4 $O/s1_$name.log
done
