#!/bin/bash
# Forty-first session: the LoRA expand in the projection's epilogue (benchmarks/gemm_expand_probe.py), either card.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
OUT=$O/probe timeout ${PROBE_S:-420} python benchmarks/gemm_expand_probe.py ${PROBE_ARGS:-} > $O/probe.log 2>&1
tail -n 20 $O/probe.log
