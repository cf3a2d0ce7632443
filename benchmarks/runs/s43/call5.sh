#!/bin/bash
# Forty-third session, call 5, either card (~150 s): issue 17's item 5 by the kernels' device time (the issue's
# own measure: "launch overhead removed"), with L2 flushed before each call (call 4 did not flush, and 64
# adapters' 37.7 MB fit the 50-MB L2), at the issue's two 70% problems and the other rows of its vLLM table.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/tune timeout 280 python benchmarks/lora_tune.py --flush-l2 --tilings '[]' --budget 250 \
  --problems mixed64,mixed256,issue_b256_a1,issue_b256_a8,issue_b32_a1,issue_b32_a8,issue_a64_r8,issue_a256_r8,s1_qkv,s1_o \
  > $O/tune.log 2>&1
tail -n 14 $O/tune.log
