#!/bin/bash
# For the forty-fifth session, call 4, either card (~200 s): where Llama-3-8B's batch-256 step (10.28 ms, 1.52x its
# floor on the H100, call 1) spends its 1.1 ms of "other" kernels: the small kernels by JAX source line (from the
# step's optimized HLO), without XLA's rematerialization pass (the default now).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/l3_b256 timeout 240 python benchmarks/engine.py --skip-warmup --model llama-3-8b --batches 256 --adapters 0 \
  --steps 16 --profile-batch 256 --hlo-sources > $O/l3_b256.log 2>&1
tail -n 45 $O/l3_b256.log
