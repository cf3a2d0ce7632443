#!/bin/bash
# Forty-first session, call 2 (after call 1 on the same card). On an H200: base-only at 60 s on call 1's trace
# (bf16 weights: issue 22's ratio), then the thirty-seventh session's packed decode tiles against heads apart, kernel
# alone, FP8 cache (never timed on an H200). On an H100: the 384-vs-256 pair again, 256 first.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
S1="--setting S1 --num-adapters 2000 --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8"
if [[ "$card" == *H200* ]]; then
  OUT=$O/s1_base timeout 250 python -m jslora.cli bench $S1 --systems base-only --num-pages 420880 \
    > $O/s1_base.log 2>&1; tail -n 4 $O/s1_base.log
  OUT=$O/att timeout 150 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 2048 --block 16 \
    --pool-pages 418832 --shapes "256,160,32,32;256,512,32,32;64,1024,32,32" \
    --tilings '[{"pack_heads":false,"num_stages":2},{"block_k":64}]' > $O/att.log 2>&1; tail -n 30 $O/att.log
else
  for n in 256 384; do
    OUT=$O/s1_seqs$n timeout 285 python -m jslora.cli bench $S1 --systems jslora --num-pages 190000 \
      --max-num-seqs $n > $O/s1_seqs$n.log 2>&1; tail -n 4 $O/s1_seqs$n.log
  done
fi
