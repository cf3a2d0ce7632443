#!/bin/bash
# Issue 21 (written in the thirty-ninth session, no GPU then): why FP8 weights' steps took 6.9 ms of dispatch a
# step at S1 against 3.2-3.4 with bf16 weights (H100, thirty-eighth session). One decode step of 200 rows, no
# LoRA, launched 64 times in each of dispatch.py's modes, bf16 then FP8 weights, with XLA's command-buffer log
# (how many graph updates a launch does, how many buffers moved, what the updates cost).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
for q in bf16 fp8; do
  OUT=$O/d_$q TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 timeout 240 python benchmarks/dispatch.py \
    --model llama-7b --batch 200 --adapters 0 $([ $q = fp8 ] && echo --quantization fp8) > $O/d_$q.log 2> $O/d_$q.xla
  tail -8 $O/d_$q.log
  python benchmarks/command_buffer_log.py $O/d_$q.xla | tail -12 | tee $O/d_$q.cmdbuf
  gzip -f $O/d_$q.xla
done
