#!/bin/bash
# Forty-first session, call 3 (the session's last ~250 s of device time): base-only at the new default of 384 running
# sequences, S1 at 60 s, for issue 22's ratio against calls 1-2's jslora at 384 (same card kind).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/s1_base384 timeout 195 python -m jslora.cli bench --setting S1 --num-adapters 2000 --rate 50 --duration 60 \
  --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages 190000 --no-reference-step --no-plots --no-progress \
  --compile-threads 8 --systems base-only --max-num-seqs 384 > $O/s1_base384.log 2>&1; tail -n 4 $O/s1_base384.log
