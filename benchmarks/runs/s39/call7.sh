#!/bin/bash
# Thirty-ninth session, call 7 (H200 only; ~270 s of device time were left): the thirty-seventh session's packed
# decode tiles against heads apart, kernel alone, FP8 and bf16 caches (never timed on an H200).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
[[ "$card" == *H200* ]] || { echo "not an H200: nothing to run"; exit 0; }
OUT=$O/att timeout 150 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 2048 --block 16 \
  --pool-pages 418832 --shapes "256,160,32,32;256,512,32,32;64,1024,32,32" \
  --tilings '[{"pack_heads":false,"num_stages":2},{"block_k":64}]' > $O/att.log 2>&1; tail -30 $O/att.log
