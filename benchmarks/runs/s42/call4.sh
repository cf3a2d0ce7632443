#!/bin/bash
# Forty-second session, either card (~300 s): call 1 found, at batch 1 / context 4,096 / Llama-3-8B heads on an H100,
# two warps with page ids read a step ahead (3 stages) 13.7 us a call against the default's 15.2. Before that
# becomes the default of split launches: the same A/B at the other split shapes (batch 8, context 1,024, MHA), bf16
# and FP8 cache, no anchors.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/att timeout 420 python benchmarks/attention.py --no-anchors --kv-fp8 both \
  --shapes "1,4096,32,8;8,4096,32,8;1,1024,32,8;4,4096,32,8;1,4096,32,32;1,1024,32,32" --tilings '[
  {"num_warps": 2, "num_stages": 3, "prefetch_pages": true}, {"num_warps": 2}, {"num_stages": 3, "prefetch_pages": true}]' > $O/att.log 2>&1
tail -n 16 $O/att.log
