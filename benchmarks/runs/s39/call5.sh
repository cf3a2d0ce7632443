#!/bin/bash
# Thirty-ninth session, call 5: S1 at 60 s, FP8 cache, chunks cut to fit (this session's default): base-only (for
# issue 22's ratio), then jslora with FP8 weights and the pages their bytes free (issue 21: 190,000 + 24,000).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
COMMON="--setting S1 --num-adapters 2000 --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
  --no-reference-step --no-plots --no-progress --fit-chunks-from 256 --compile-threads 8"
OUT=$O/s1_base timeout 250 python -m jslora.cli bench $COMMON --systems base-only --num-pages 190000 > $O/s1_base.log 2>&1
tail -4 $O/s1_base.log
OUT=$O/s1_fp8_pages timeout 260 python -m jslora.cli bench $COMMON --systems jslora --num-pages 214000 \
  --quantization fp8 > $O/s1_fp8_pages.log 2>&1
tail -4 $O/s1_fp8_pages.log
