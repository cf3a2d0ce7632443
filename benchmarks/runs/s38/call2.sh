#!/bin/bash
# Thirty-eighth session, call 2: quarter-octave step buckets (new default) against the old powers of two /
# steps of 256, by the engine's step device time and by S1 (FP8 cache, n = 2000). New first: the old shapes
# are a subset of the new, so the second process of each pair loads them from the compilation cache.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OLD_DECODE=1,4,8,16,32,64,128,256
OLD_STEPS=16,32,64,128,256,$(seq -s, 512 256 4096)
pages=190000; grep -q H200 $O/card.txt && pages=420880
for v in new old; do
  extra=""; [ $v = old ] && extra="--decode-buckets $OLD_DECODE --step-buckets $OLD_STEPS"
  OUT=$O/eng_$v timeout 200 python benchmarks/engine.py --skip-warmup --model llama-7b --batches 200,256 \
    --adapters 0 --steps 12 --prompt 480 --chunk 352 --kv-cache-dtype fp8 $extra > $O/eng_$v.log 2>&1
  grep -E "^batch|x floor|^ *[0-9]" $O/eng_$v.log | tail -8
done
for v in new old; do
  extra=""; [ $v = old ] && extra="--decode-buckets $OLD_DECODE --step-buckets ${OLD_STEPS%%,2304*}"
  OUT=$O/s1_$v timeout 190 python -m jslora.cli bench --setting S1 --systems jslora --num-adapters 2000 \
    --rate 50 --duration 20 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages $pages \
    --no-reference-step --no-plots --no-progress $extra > $O/s1_$v.log 2>&1
  tail -5 $O/s1_$v.log
done
