#!/bin/bash
# Fortieth session, call 1, cut to ~500 s (eight starts failed first and left ~880 s of device time). On an H200
# (none lent since the thirty-second session): the thirty-seventh session's packed decode tiles against heads apart,
# kernel alone; then S1 at 30 s with everything since (buckets a quarter octave apart, packed heads, the cut),
# jslora and base-only, for issue 22's H200 figures. On an H100: XLA's block-level fusions against the default at
# batch 1 and 32 (call2.sh says more), then S1 at 20 s with a larger running batch (--max-num-seqs 384) and the
# default 256 on the same machine.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
S1="--setting S1 --num-adapters 2000 --rate 50 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8"
if [[ "$card" == *H200* ]]; then
  OUT=$O/att timeout 130 python benchmarks/attention.py --no-anchors --kv-fp8 both --table 2048 --block 16 \
    --pool-pages 418832 --shapes "256,160,32,32;256,512,32,32;64,1024,32,32" \
    --tilings '[{"pack_heads":false,"num_stages":2},{"block_k":64}]' > $O/att.log 2>&1; tail -30 $O/att.log
  for s in jslora base-only; do
    OUT=$O/s1_$s timeout 165 python -m jslora.cli bench $S1 --systems $s --duration 30 --num-pages 420880 \
      > $O/s1_$s.log 2>&1; tail -4 $O/s1_$s.log
  done
else
  OUT=$O/modes timeout 220 python benchmarks/xla_modes.py --tag small_kernels --variants default,block_level \
    --timeout-s 105 --engine-args "--skip-warmup --model llama-7b --batches 1,32 --adapters 0 --steps 24" \
    > $O/modes.log 2>&1; tail -8 $O/modes.log
  for n in 384 256; do
    OUT=$O/s1_seqs$n timeout $([ $n = 384 ] && echo 170 || echo 115) python -m jslora.cli bench $S1 \
      --systems jslora --duration 20 --num-pages 190000 --max-num-seqs $n > $O/s1_seqs$n.log 2>&1
    tail -4 $O/s1_seqs$n.log
  done
fi
