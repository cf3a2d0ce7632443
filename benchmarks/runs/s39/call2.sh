#!/bin/bash
# Issue 21 (written in the thirty-ninth session, no GPU then): why FP8 weights' steps took 6.9 ms of dispatch a
# step at S1 against 3.2-3.4 with bf16 weights (H100, thirty-eighth session). One decode step of 200 rows, no
# LoRA, launched 64 times in each of dispatch.py's modes, bf16 then FP8 weights, with XLA's command-buffer log
# (how many graph updates a launch does, how many buffers moved, what the updates cost). On an H200 first: the
# thirty-seventh session's packed decode tiles against heads apart, kernel alone (never timed there).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
if [[ "$card" == *H200* ]]; then
  OUT=$O/att timeout 120 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 2048 --block 16 \
    --pool-pages 418832 --shapes "256,160,32,32;256,512,32,32;64,1024,32,32" \
    --tilings '[{"pack_heads":false,"num_stages":2},{"block_k":64}]' > $O/att.log 2>&1; tail -30 $O/att.log
fi
for q in bf16 fp8; do
  OUT=$O/d_$q TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 timeout 240 python benchmarks/dispatch.py \
    --model llama-7b --batch 200 --adapters 0 $([ $q = fp8 ] && echo --quantization fp8) > $O/d_$q.log 2> $O/d_$q.xla
  tail -8 $O/d_$q.log
  python benchmarks/command_buffer_log.py $O/d_$q.xla | tail -12 | tee -a $O/d_$q.log
  rm -f $O/d_$q.xla  # at most 8 files come back
done
