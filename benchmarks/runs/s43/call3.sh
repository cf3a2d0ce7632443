#!/bin/bash
# For the forty-third session, either card (~450 s): around the new batch-1 GQA default (2 warps, 3 stages, page ids
# a step ahead, 32 splits of 64-key steps: 13.4 us on an H100), the neighbours never timed with it: 4 stages, 32- and
# 128-key steps (128 at 4 warps: 14.4 us without prefetch), 16 splits; context 4,096 in a 4,096-wide table, bf16.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/att timeout 240 python benchmarks/attention.py --no-anchors --shapes "1,4096,32,8" --tilings '[
  {"num_stages": 4}, {"block_k": 32}, {"block_k": 128, "num_warps": 4}, {"splits": 16}, {"splits": 16, "block_k": 128},
  {"num_warps": 1}]' > $O/att.log 2>&1
tail -n 12 $O/att.log
# Then the whole step: Llama-3-8B batch 1 at context ~4,045 (32 splits), the new batch-1 tiling
# on and off (the twenty-fifth session's 4.861 ms, 1.32x the floor, was the old tiling on an H200).
for pipe in on off; do
  OUT=$O/engine_$pipe timeout 150 python benchmarks/engine.py --skip-warmup --model llama-3-8b --batches 1 --adapters 0 \
    --prompt 4020 --steps 16 --attention-single-pipeline $pipe > $O/engine_$pipe.log 2>&1
  tail -n 3 $O/engine_$pipe.log
done
