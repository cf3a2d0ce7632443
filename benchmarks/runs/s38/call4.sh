#!/bin/bash
# Thirty-eighth session, call 4: base-only on S1 (20 s, FP8 cache) with the
# quarter-octave buckets (new default) and then the old shapes (loaded from the compilation cache).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
pages=190000; grep -q H200 $O/card.txt && pages=420880
for v in new old; do
  extra=""; [ $v = old ] && extra="--decode-buckets 1,4,8,16,32,64,128,256 --step-buckets 16,32,64,128,256,$(seq -s, 512 256 2048)"
  OUT=$O/s1_$v timeout 165 python -m jslora.cli bench --setting S1 --systems base-only --num-adapters 2000 \
    --rate 50 --duration 20 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --num-pages $pages \
    --no-reference-step --no-plots --no-progress $extra > $O/s1_$v.log 2>&1
  tail -5 $O/s1_$v.log
done
