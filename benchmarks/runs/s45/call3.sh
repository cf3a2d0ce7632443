#!/bin/bash
# For the forty-fifth session, call 3, either card (~450 s; after calls 1-2): does XLA's rematerialization pass
# (off by default since call 1; it gave up on every step compile: "Can't reduce memory use below 56-67 GiB ...
# only reduced to 143-172 GiB") cost start-up time? Cold and warm start of the S1 engine (Llama-7B, 8 compile
# threads) without the pass (default) and with it, each with its own empty compilation cache.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/noremat timeout 220 python benchmarks/startup.py --model llama-7b --compile-threads 8 > $O/noremat.log 2>&1
tail -n 4 $O/noremat.log
OUT=$O/remat timeout 220 python benchmarks/startup.py --model llama-7b --compile-threads 8 --xla-rematerialization \
  > $O/remat.log 2>&1
tail -n 4 $O/remat.log
