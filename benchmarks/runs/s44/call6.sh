#!/bin/bash
# Forty-fourth session, call 6, either card (~450 s): why Llama-3-8B's batch-32 step at context ~1,024 is 1.41x its
# floor (call 5). At 32 sequences x 8 KV heads the decode launch has 256 programs, under decode_launch_params' 264,
# so it splits the context in two (64-key steps, 4 warps, no page ids ahead) and XLA merges; at 64 sequences it is
# unsplit (2 warps, 3 stages, ids ahead: 94% of the copy rate). 1) the kernel at batch 16-32 as it is, unsplit, and
# merged in the kernel; 2) the step's per-op profile; 3) item 4's 256-adapter cell at context ~1,024.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/attention timeout 150 python benchmarks/attention.py --no-anchors --table 2048 \
  --shapes "32,1024,32,8;32,160,32,8;24,1024,32,8;16,1024,32,8;32,4096,32,8" --tilings '[
  {"splits": 1, "block_k": 32, "prefetch_pages": true, "num_warps": 2, "num_stages": 3, "combine": "xla"},
  {"combine": "kernel"}]' > $O/attention.log 2>&1
grep -E "device|^ *[0-9]+ " $O/attention.log | sed -E "s/'min_split_keys'.*'combine'/.. 'combine'/" | cut -c1-230 | tail -n 24
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
OUT=$O/l3_b32 timeout 130 python benchmarks/engine.py --skip-warmup --model llama-3-8b --batches 32 --adapters 0 \
  --prompt 1000 --steps 16 --profile-batch 32 > $O/l3_b32.log 2>&1
grep -vE "^(W|I)[0-9]{4}|^\{" $O/l3_b32.log | tail -n 24
OUT=$O/l3_a256 timeout 150 python benchmarks/engine.py --skip-warmup --model llama-3-8b --batches 256 --adapters 256 \
  --prompt 1000 --steps 16 > $O/l3_a256.log 2>&1
grep -E "^(adapters|  *none|  *[0-9]+ )" $O/l3_a256.log | tail -n 3
