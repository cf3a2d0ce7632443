#!/bin/bash
# For the forty-sixth session, whichever card comes (<= 575 s): on an H200, issue 22's S1 with FP8 then bf16 weights
# (s44/call1.sh, owed since the thirty-ninth session; its bf16 run is also S1 as the engine now is); on an H100,
# call1.sh (S1 as now, then batch 256's small kernels by source line).
card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
if [[ "$card" == *H200* ]]; then exec bash benchmarks/runs/s44/call1.sh; fi
exec bash benchmarks/runs/s46/call1.sh
