#!/bin/bash
# Thirty-eighth session, call 1: on an H200, the packed decode tiles (kernel alone, engine step, S1's FP8 cache);
# on an H100 (already measured there), S1 with FP8 weights and the FP8 cache, jslora beside base-only.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
if [[ "$card" == *H200* ]]; then
  OUT=$O/att timeout 150 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 2048 --block 16 \
    --pool-pages 418832 --shapes "256,160,32,32;256,512,32,32;64,1024,32,32" \
    --tilings '[{"pack_heads":false,"num_stages":2},{"block_k":64}]' > $O/att.log 2>&1
  tail -30 $O/att.log
  for p in off on; do
    OUT=$O/eng_$p timeout 170 python benchmarks/engine.py --skip-warmup --model llama-7b --batches 256 --adapters 0 \
      --steps 12 --prompt 480 --profile-batch 256 --attention-alone --kv-cache-dtype fp8 --attention-pack-heads $p \
      > $O/eng_$p.log 2>&1
    tail -4 $O/eng_$p.log
  done
else
  OUT=$O/s1 timeout 520 python -m jslora.cli bench --setting S1 --systems jslora,base-only --num-adapters 2000 \
    --rate 50 --duration 20 --preload --host-adapter-gb 48 --kv-cache-dtype fp8 --quantization fp8 \
    --num-pages 190000 --compile-threads 8 --no-reference-step --no-plots --no-progress > $O/s1.log 2>&1
  tail -8 $O/s1.log
fi
