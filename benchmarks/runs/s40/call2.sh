#!/bin/bash
# Fortieth session, call 2 (after call 1 on the same card). On an H200: S1 at 60 s with FP8 weights (issue 21's
# "S1 at saturation with FP8 vs bf16" on the issue's card; bf16 is call 1's jslora run). On an H100: S1 at 30 s,
# base-only at 384 and 256 running sequences (does base-only gain what jslora gains from a larger batch?).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
S1="--setting S1 --num-adapters 2000 --rate 50 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8"
if [[ "$card" == *H200* ]]; then
  OUT=$O/s1_fp8w timeout 230 python -m jslora.cli bench $S1 --systems jslora --duration 60 --num-pages 420880 \
    --quantization fp8 > $O/s1_fp8w.log 2>&1; tail -4 $O/s1_fp8w.log
else
  for n in 384 256; do
    OUT=$O/s1_base_seqs$n timeout $([ $n = 384 ] && echo 220 || echo 150) python -m jslora.cli bench $S1 \
      --systems base-only --duration 30 --num-pages 190000 --max-num-seqs $n > $O/s1_base_seqs$n.log 2>&1
    tail -4 $O/s1_base_seqs$n.log
  done
fi
