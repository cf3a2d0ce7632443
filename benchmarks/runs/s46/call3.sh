#!/bin/bash
# For the forty-sixth session, whichever card comes (<= 590 s): on an H200, issue 22's S1 with FP8 then bf16 weights
# (s44/call1.sh; its bf16 run is also S1 as the engine now is); on an H100, call1.sh (S1 as now, then batch 256's
# small kernels by source line), then the sampling tail alone (benchmarks/sampling_probe.py, lever 7).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
if [[ "$card" == *H200* ]]; then exec bash benchmarks/runs/s44/call1.sh; fi
O=$OUT
bash benchmarks/runs/s46/call1.sh
OUT=$O timeout 70 python benchmarks/sampling_probe.py > $O/sampling.log 2>&1; tail -n 6 $O/sampling.log
