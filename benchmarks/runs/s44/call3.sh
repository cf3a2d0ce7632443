#!/bin/bash
# For the forty-fourth session, call 3, either card (~120 s): issue 17's LoRA kernels at 64 adapters of ranks 8-64
# (46% of the copy rate by device time, forty-third session; 70% asked). The expand is the larger part (16.3 of
# 27.1 us); earlier sweeps saw it at 11.5 us with the shrink unsplit (k_splits 1, which made the shrink 19 us).
# Around the expand: 2 splits, its warps, wider column blocks; L2 flushed, device time.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/tune timeout 200 python benchmarks/lora_tune.py --flush-l2 --budget 170 --problems mixed64,mixed256 --tilings '[
  {"k_splits": 2}, {"k_splits": 1}, {"expand_warps": 2}, {"out_block": 256}, {"out_block": 64},
  {"k_splits": 2, "expand_warps": 2}]' > $O/tune.log 2>&1
tail -n 6 $O/tune.log
grep -E "kernels_us" $O/tune.log | sed -E 's/one_row_fma.*expand_warps=/... expand_warps=/' | cut -c1-300
