#!/bin/bash
# Forty-third session, call 4, either card (~300 s): issue 17's item 5 (LoRA kernels at 64 / 256 adapters of ranks
# 8-64). Rank blocks of 16 make the expand walk up to 4 blocks one after another (a fori_loop of dependent
# gathers) and the shrink's grid 4 programs a tile; a rank block as wide as the max rank (masked past each
# adapter's rank, so a rank-8 adapter still reads 8 rows) lets the expand issue all its reads at once (loads_first)
# and the shrink read 64 rows a step. Never timed: rank_block 32 and 64.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/tune timeout 330 python benchmarks/lora_tune.py --problems mixed64,mixed256 --budget 290 --tilings '[
  {"rank_block": 32}, {"rank_block": 64}, {"rank_block": 64, "loads_first": true},
  {"rank_block": 64, "loads_first": true, "early_pages": true, "out_block": 256, "out_loop": 4},
  {"rank_block": 64, "loads_first": true, "k_splits": 8}, {"rank_block": 32, "shrink_warps": 4}]' > $O/tune.log 2>&1
tail -n 8 $O/tune.log
grep -E "rank_block|kernels_us" $O/tune.log | sed 's/per_token=False //' | cut -c1-400
