#!/bin/bash
# The next GPU session's first call (written in the thirty-eighth session). On an H200: the thirty-seventh
# session's packed decode tiles against heads apart, and the thirty-eighth's buckets (engine step and S1). On an
# H100 (both measured there): issue 21's S1 pair, bf16 against FP8 weights, jslora at 60 s with the FP8 cache.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
OLD="--decode-buckets 1,4,8,16,32,64,128,256 --step-buckets 16,32,64,128,256,$(seq -s, 512 256 4096)"
S1="--setting S1 --systems jslora --num-adapters 2000 --rate 50 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress"
if [[ "$card" == *H200* ]]; then
  OUT=$O/att timeout 150 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 2048 --block 16 \
    --pool-pages 418832 --shapes "256,160,32,32;256,512,32,32;64,1024,32,32" \
    --tilings '[{"pack_heads":false,"num_stages":2},{"block_k":64}]' > $O/att.log 2>&1; tail -30 $O/att.log
  for v in new old; do
    OUT=$O/eng_$v timeout 170 python benchmarks/engine.py --skip-warmup --model llama-7b --batches 176,256 \
      --adapters 0 --steps 12 --prompt 480 --chunk 352 --kv-cache-dtype fp8 $([ $v = old ] && echo $OLD) \
      > $O/eng_$v.log 2>&1; grep -E "^batch" $O/eng_$v.log
  done
  OUT=$O/s1 timeout 190 python -m jslora.cli bench $S1 --duration 20 --num-pages 420880 > $O/s1.log 2>&1
  tail -4 $O/s1.log
else
  for q in bf16 fp8; do
    OUT=$O/s1_$q timeout 280 python -m jslora.cli bench $S1 --duration 60 --num-pages 190000 \
      $([ $q = fp8 ] && echo --quantization fp8) > $O/s1_$q.log 2>&1; tail -4 $O/s1_$q.log
  done
fi
