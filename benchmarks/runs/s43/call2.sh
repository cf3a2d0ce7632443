#!/bin/bash
# For the forty-third session (carried from the forty-second, no H200 came), call 2, H200 only (~570 s): the forty-first session's call 1, whose H200 branch never
# ran: issue 22's S1 at 60 s with everything since (quarter-octave buckets, packed heads, the cut, and now 384 running
# sequences by default), jslora n = 2000, FP8 cache, with FP8 weights and then bf16 weights, each with a 5-s profile.
card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
if [[ "$card" == *H200* ]]; then
  exec bash benchmarks/runs/s41/call1.sh
fi
echo "$card: H200 only (call 1's H100 branch, 384 against 256 running sequences, ran in the forty-first session)"
