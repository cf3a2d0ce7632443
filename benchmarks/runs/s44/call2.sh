#!/bin/bash
# For the forty-fourth session, call 2, either card (~250 s): where Llama-3-8B's batch-32 step goes. On the H100 it
# took 7.89 ms against 5.81 at batch 1 (+2.08 ms; Llama-2-7B +1.24) and 1.50x its floor (forty-third session, call
# 6); on the H200 the twenty-third session saw the same step move 26% between processes (GEMM autotuning). Per-op
# device time of both models' batch-32 steps, one process each.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
for model in llama-3-8b llama-7b; do
  OUT=$O/$model timeout 120 python benchmarks/engine.py --skip-warmup --model $model --batches 1,32 --adapters 0 \
    --steps 24 --profile-batch 1,32 > $O/$model.log 2>&1
  grep -vE "^(W|I)[0-9]{4}" $O/$model.log | tail -n 30
done
