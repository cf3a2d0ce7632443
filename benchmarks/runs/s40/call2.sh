#!/bin/bash
# Fortieth session, call 2 (after call 1 on the same card). On an H200: S1 at 60 s with FP8 weights (issue 21's
# "S1 at saturation with FP8 vs bf16" on the issue's card; bf16 is call 1's jslora run). On either card: XLA's
# block-level fusions (an RMSNorm's reduction and scaling in one kernel), never timed, against the default twice,
# Llama-7B decode steps at batch 1 and 32 (issue 17's small-batch steps; each variant a process of its own).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
S1="--setting S1 --num-adapters 2000 --rate 50 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8"
if [[ "$card" == *H200* ]]; then
  OUT=$O/s1_fp8w timeout 230 python -m jslora.cli bench $S1 --systems jslora --duration 60 --num-pages 420880 \
    --quantization fp8 > $O/s1_fp8w.log 2>&1; tail -4 $O/s1_fp8w.log
fi
OUT=$O/modes timeout 330 python benchmarks/xla_modes.py --tag small_kernels --variants default,block_level,default-2 \
  --timeout-s 110 --engine-args "--skip-warmup --model llama-7b --batches 1,32 --adapters 0 --steps 24" \
  > $O/modes.log 2>&1; tail -12 $O/modes.log
