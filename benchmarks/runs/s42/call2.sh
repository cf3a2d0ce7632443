#!/bin/bash
# For the forty-second session, call 2 (the forty-first session's call 1; its H200 branch never ran). On an H200 (none lent since the thirty-second session): issue 22's S1 at 60 s with
# everything since (quarter-octave buckets, packed heads, the cut), jslora n = 2000, FP8 cache, first with FP8
# weights (issue 21's "S1 at saturation with FP8 vs bf16" on the issue's card, and the likeliest 45 req/s), then
# bf16 weights, each with a 5-s profile (attention's share of the step with packed heads), at the default of 384
# running sequences since the forty-first session. H200 only.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; card=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$card" | tee $O/card.txt
S1="--setting S1 --num-adapters 2000 --rate 50 --duration 60 --preload --host-adapter-gb 48 --kv-cache-dtype fp8
    --no-reference-step --no-plots --no-progress --compile-threads 8"
if [[ "$card" == *H200* ]]; then
  for q in fp8 bf16; do
    OUT=$O/s1_$q timeout 285 python -m jslora.cli bench $S1 --systems jslora --num-pages 420880 --profile-window 20,5 \
      $([ $q = fp8 ] && echo --quantization fp8) > $O/s1_$q.log 2>&1; tail -n 4 $O/s1_$q.log
  done
else
  echo "H200 only: its H100 branch (384 against 256 running sequences) ran in the forty-first session"
fi
