#!/bin/bash
# For the forty-fourth session, call 3, either card (~420 s): issue 17's LoRA kernels where tiles hold several rows
# (64 adapters of ranks 8-64: 46% of the copy rate by device time, forty-third session; 70% asked; and the issue's
# 1- and 8-adapter rows, where ours on an H100 was 6-12% slower than vLLM's H200 figures). Earlier sweeps saw the
# expand grow with the shrink's splits there (11.5-11.7 us unsplit, 15.5 at 4, 22.0 at 8 splits: it adds the
# partials of every rank block it walks). merge_splits (this session, untimed): the shrink's last split of a
# tile's rank block adds them up itself, so the expand reads one partial; the same numbers, bit for bit (tested).
# Beside it: 2 splits, the expand at 2 warps, wider column blocks; and `chained` (this session, untimed): shrink
# and expand in one launch, each expand program waiting on its tile's count after issuing its reads of B (its
# spin relies on blocks starting in index order: if it hangs, the timeout ends the call, the rows before kept).
# L2 flushed, device time; the launch named lora_chained counts as both kernels.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
P=mixed64,issue_b256_a1,issue_b256_a8,issue_b32_a1,n5_qkv,prefill_qkv,mixed256,s1_qkv
OUT=$O/tune timeout 260 python benchmarks/lora_tune.py --flush-l2 --budget 230 --problems $P --tilings '[
  {"merge_splits": true}, {"merge_splits": true, "k_splits": 8}, {"k_splits": 2}, {"expand_warps": 2},
  {"merge_splits": true, "out_block": 256}]' > $O/tune.log 2>&1
tail -n 9 $O/tune.log
grep -E "kernels_us" $O/tune.log | sed -E 's/one_row_fma.*expand_warps=/... expand_warps=/' | cut -c1-300
OUT=$O/chained timeout 150 python benchmarks/lora_tune.py --flush-l2 --budget 120 --problems $P \
  --tilings '[{"chained": true}]' > $O/chained.log 2>&1
tail -n 9 $O/chained.log
# If merge_splits wins on the several-row problems and loses nowhere: the engine's S1 and n = 5 step with it,
# `engine.py --model llama-7b --batches 256 --adapters 5,256 --rank 8 --decode-lora-tiling '{"merge_splits": true}'`.
