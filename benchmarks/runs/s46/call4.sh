#!/bin/bash
# call3.sh reordered for a short budget: on an H200, S1 with FP8 then bf16 weights (s44/call1.sh); on an H100, S1
# as now (s45/call6.sh), the sampling probe, then batch 256's small kernels by source line (s45/call4.sh) if time is left.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
if [[ "$card" == *H200* ]]; then exec bash benchmarks/runs/s44/call1.sh; fi
O=$OUT; mkdir -p $O/s1run $O/b256run
OUT=$O/s1run bash benchmarks/runs/s45/call6.sh
OUT=$O timeout 70 python benchmarks/sampling_probe.py > $O/sampling.log 2>&1; tail -n 6 $O/sampling.log
OUT=$O/b256run bash benchmarks/runs/s45/call4.sh
