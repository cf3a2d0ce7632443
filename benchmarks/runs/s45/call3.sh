#!/bin/bash
# For the forty-fifth session, call 3, either card (~450 s; after calls 1-2): does XLA's rematerialization
# pass, which every step compile runs and gives up on ("Can't reduce memory use below 56-67 GiB ... only reduced
# to 143-172 GiB": its estimate counts the donated pool twice), cost start-up time? Cold and warm start of the
# S1 engine (Llama-7B, 8 compile threads), as is and without the pass
# (xla_disable_hlo_passes=rematerialization, what --no-xla-rematerialization sets per step; a slop factor of
# 1000 left the pass running: forty-fourth session, call 7), each with its own empty compilation cache.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/default timeout 220 python benchmarks/startup.py --model llama-7b --compile-threads 8 > $O/default.log 2>&1
tail -n 4 $O/default.log
XLA_FLAGS="--xla_disable_hlo_passes=rematerialization" OUT=$O/noremat timeout 220 python benchmarks/startup.py \
  --model llama-7b --compile-threads 8 > $O/noremat.log 2>&1
tail -n 4 $O/noremat.log; grep -c "Can't reduce" $O/default.log $O/noremat.log
