#!/bin/bash
# For the forty-fifth session, call 1, either card (~570 s; first in priority): does XLA's rematerialization pass
# clone the step's GEMMs? In the forty-fourth session, Llama-3-8B's batch-32 step ran ~190 GEMM launches (7.77 ms,
# 1.49x its floor) in a process that compiled batches 1, 32 and 256, against ~126 (6.38 ms, 1.23x) in one that
# compiled 1 and 32; every step compile logs the pass giving up ("Can't reduce memory use below 59 GiB"), and a
# slop factor of 1000 only raised its limit (143 GiB, still under the 150 it counts). --no-xla-rematerialization
# compiles the step without the pass (xla_disable_hlo_passes). Both processes with batch 32's and 256's profiles;
# grep counts the pass's lines (0 expected without it).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 PYTHONUNBUFFERED=1 JSLORA_COMMIT=${JSLORA_COMMIT:-unknown}
O=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/card.txt
for run in "noremat --no-xla-rematerialization" "default"; do
  set -- $run; name=$1; shift
  OUT=$O/l3_$name timeout 200 python benchmarks/engine.py --skip-warmup --model llama-3-8b --batches 1,32,256 \
    --adapters 0,256 --steps 16 --profile-batch 32,256 "$@" > $O/l3_$name.log 2>&1
  echo "== $name: $(grep -c "Can't reduce" $O/l3_$name.log) rematerialization lines"
  grep -E "^(adapters|  *none|  *[0-9]+ )" $O/l3_$name.log | tail -n 5
  grep -A4 "^adapters batch  *GEMM" $O/l3_$name.log
done
python - "$O" <<'PY'
import json, sys
for name in ("noremat", "default"):
    try:
        rows = json.load(open(f"{sys.argv[1]}/l3_{name}/engine.json"))["rows"]
    except OSError:
        continue
    for r in rows:
        launches = r.get("launches_by_kind")
        print(name, r["batch"], r["distinct_adapters"], f"{r['device_ms']:.2f} ms {r['device_over_floor']:.3f}x floor",
              f"GEMM launches a step {launches['GEMM']:.0f}" if launches else "")
PY
# and the same greedy tokens without the pass (Llama-7B shapes, one process; benchmarks/step_parity.py)
OUT=$O/parity timeout 120 python benchmarks/step_parity.py --baseline pdl --others no_remat > $O/parity.log 2>&1
tail -n 6 $O/parity.log
