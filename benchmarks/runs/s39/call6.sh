#!/bin/bash
# Thirty-ninth session, call 6: S1 at 30 s (jslora, FP8 cache, n = 2000, the cut on) with a larger running batch,
# --max-num-seqs 384, then the default 256 as its baseline on the same machine (its shapes are a subset: cached).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
for n in 384 256; do
  OUT=$O/s1_seqs$n timeout $([ $n = 384 ] && echo 220 || echo 150) python -m jslora.cli bench --setting S1 \
    --systems jslora --num-adapters 2000 --rate 50 --duration 30 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 \
    --num-pages 190000 --no-reference-step --no-plots --no-progress --compile-threads 8 --max-num-seqs $n \
    > $O/s1_seqs$n.log 2>&1
  tail -4 $O/s1_seqs$n.log
done
