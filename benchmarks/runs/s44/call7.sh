#!/bin/bash
# Forty-fourth session, call 7, either card (~200 s; the session's last 245 s of device time): Llama-3-8B's batch-32
# step was 1.50x / 1.41x its floor in processes that also ran batch 256 (forty-third call 6; call 5) and 1.23x /
# 1.19x in processes whose largest batch was 32 (calls 2 and 6). The batch-1/32/256 process again, with batch 32's
# per-op profile, to see which kernels carry the difference if it comes back.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/l3 timeout 175 python benchmarks/engine.py --skip-warmup --model llama-3-8b --batches 1,32,256 --adapters 0 \
  --steps 16 --profile-batch 32 > $O/l3.log 2>&1
grep -vE "^(W|I)[0-9]{4}|^\{" $O/l3.log | tail -n 30
