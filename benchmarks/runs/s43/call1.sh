#!/bin/bash
# For the forty-third session, either card (~450 s): the forty-second session made two warps with page ids a step
# ahead the default of batch-1 GQA launches split 32 ways (13.4 against 15.0 us at context 4,096 in a 4,096-wide
# table, H100). In the engine the table is max_model_len wide (Llama-3-8B: 8,192), so that launch also serves short
# contexts, where most of the 32 splits are empty. The A/B there, bf16 and FP8 cache: new default against the old
# tiling, contexts 160 / 1,024 / 4,096 in an 8,192-wide table. If the new one loses at short contexts, narrow the
# rule in decode_launch_params (or revert b728931's rule).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/att timeout 300 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 8192 \
  --shapes "1,160,32,8;1,1024,32,8;1,4096,32,8" --tilings '[{"num_warps": 4, "num_stages": 2, "prefetch_pages": false}]' \
  > $O/att.log 2>&1
tail -n 9 $O/att.log
# Then the anchors with JAX's kernel device-timed too (since the forty-second session's last commit: its "loop"
# figure carries a while loop's ~20 us a call, so 32.4 us at batch 1 could be a kernel as fast as ours), and
# JAX's kernel at context 160 now that 1-2 pages a block are tried.
OUT=$O/anchors timeout 260 python benchmarks/attention.py --shapes "1,4096,32,8;8,4096,32,8;64,1024,32,8;256,160,32,8;256,160,32,32" \
  --tilings '[]' > $O/anchors.log 2>&1
tail -n 9 $O/anchors.log
