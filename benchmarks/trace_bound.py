"""The most a `jslora bench` trace can reach on one GPU, from its bytes and flops (no GPU needed).

    python benchmarks/trace_bound.py --setting S2 --num-adapters 5,2000 --batch 214

Over the whole trace: every decode token reads the K and V of its context; every prompt and output token
goes through the model's linear weights (2 flops per weight); every step reads the weights once and the
LoRA rows of each distinct adapter in it. A step runs its GEMMs, its attention and its LoRA kernels one
after the other (XLA's single-stream step), so the device time is at least max(GEMM flops / matmul rate,
weight bytes / copy rate) + (KV + adapter) bytes / copy rate, with rates from a GPU run (defaults: one
H200, benchmarks/RESULTS.md). Steps: the trace's decode tokens / `--batch` (the running batch a saturated
run keeps, from its timeline). trace/ref: the trace's output tok/s over the same bound for issue 22's reference,
a decode-only batch of `--batch` rows at the trace's mean decode context (what `jslora bench` runs after a trace):
the trace's prompt tokens are GEMM rows the reference does not run, so at S1's lengths (prompts as long as
outputs) this stays well under 1 even with every kernel at its ceiling.

Distinct adapters per step, for the adapter bytes: "fcfs" counts them in windows of `--batch` requests
consecutive in arrival order (first come, first served at saturation runs about those together);
"grouped Q" is the fewest adapters whose queued requests fill the batch when a scheduler may pick freely
among the next Q queued requests (adapter-aware admission at its limit).
"""
from __future__ import annotations

import argparse

import numpy as np

from jslora.bench.reference import decode_context
from jslora.bench.trace import TraceConfig, adapter_ranks, generate_trace
from jslora.config import ModelConfig, slora_setting

LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def linear_params(cfg: ModelConfig) -> int:
    """Weights every token multiplies: the layers' projections and the LM head."""
    per_layer = sum(int(np.prod(cfg.module_shape(name))) for name in LINEAR)
    return per_layer * cfg.num_layers + cfg.hidden_size * cfg.vocab_size


def adapter_bytes(cfg: ModelConfig, rank: int, targets=("q", "k", "v", "o"), itemsize: int = 2) -> int:
    """Bytes of one adapter's A and B over every layer."""
    return sum(rank * sum(cfg.module_shape(t)) for t in targets) * cfg.num_layers * itemsize


def distinct_fcfs(adapters: np.ndarray, batch: int) -> float:
    """Mean distinct adapters in windows of `batch` requests consecutive in arrival order."""
    starts = range(0, max(1, len(adapters) - batch + 1), max(1, batch // 4))
    return float(np.mean([len(set(adapters[s:s + batch].tolist())) for s in starts]))


def distinct_grouped(adapters: np.ndarray, batch: int, queue: int) -> float:
    """Mean number of adapters, most-queued first, whose requests among `queue` consecutive ones fill `batch`."""
    counts = []
    for s in range(0, max(1, len(adapters) - queue + 1), max(1, queue // 4)):
        per_adapter = np.sort(np.unique(adapters[s:s + queue], return_counts=True)[1])[::-1]
        counts.append(int(np.searchsorted(np.cumsum(per_adapter), min(batch, queue))) + 1)
    return float(np.mean(counts))


def bound(trace, cfg: ModelConfig, ranks: dict[str, int], batch: int, distinct: float, copy_rate: float,
          matmul_rate: float, kv_itemsize: int = 2, weight_itemsize: int = 2) -> dict:
    prompts = np.array([t.prefix_len + t.prompt_len for t in trace], np.float64)
    outputs = np.array([t.output_len for t in trace], np.float64)
    kv_per_token = cfg.num_layers * 2 * cfg.kv_width * kv_itemsize
    # a decode token at context c reads c tokens' K and V: the trace's mean decode context per output token
    context = decode_context(trace)
    kv_bytes = kv_per_token * context * outputs.sum()
    params = linear_params(cfg)
    gemm_flops = 2 * params * (prompts.sum() + outputs.sum())
    steps = outputs.sum() / batch
    weight_bytes = params * weight_itemsize * steps
    named = [t.adapter for t in trace if t.adapter is not None]
    mean_adapter = float(np.mean([adapter_bytes(cfg, ranks[a]) for a in named])) if named else 0.0
    lora_bytes = distinct * mean_adapter * steps
    # a GEMM takes the longer of its flops and its weight reads; attention's KV and the LoRA kernels' rows
    # are read by kernels of their own, after it
    seconds = max(gemm_flops / matmul_rate, weight_bytes / copy_rate) + (kv_bytes + lora_bytes) / copy_rate
    # issue 22's reference: the same engine decoding `batch` rows at the trace's mean decode context, no prompts
    # (jslora.bench.reference), bounded the same way; the trace's prompt tokens are work it does not do
    reference_step = (max(2 * params * batch / matmul_rate, params * weight_itemsize / copy_rate)
                      + (batch * context * kv_per_token + distinct * mean_adapter) / copy_rate)
    trace_tok_s = outputs.sum() / seconds
    return {"requests": len(trace), "steps": steps, "kv_tb": kv_bytes / 1e12, "gemm_tflop": gemm_flops / 1e12,
            "weights_tb": weight_bytes / 1e12, "distinct_per_step": distinct, "adapter_gb_per_step":
            distinct * mean_adapter / 1e9, "lora_tb": lora_bytes / 1e12, "device_s": seconds,
            "req_s": len(trace) / seconds, "tok_s": trace_tok_s, "reference_tok_s": batch / reference_step,
            "trace_over_reference": trace_tok_s * reference_step / batch}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="S1")
    ap.add_argument("--num-adapters", default="5,2000")
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch", type=int, default=214, help="running batch at saturation (bench timeline)")
    ap.add_argument("--queues", default="512,1024", help="queue depths Q for the grouped (adapter-aware) bound")
    ap.add_argument("--copy-rate", type=float, default=4.25e12, help="bytes/s (measured device copy)")
    ap.add_argument("--matmul-rate", type=float, default=7.11e14, help="flop/s (measured bf16 matmul)")
    ap.add_argument("--fp8-kv", action="store_true", help="K and V read as 1 byte each (--kv-cache-dtype fp8)")
    ap.add_argument("--fp8-weights", action="store_true",
                    help="weights read as 1 byte each (--quantization fp8; pass the FP8 matmul rate too)")
    args = ap.parse_args(argv)
    setting = slora_setting(args.setting)
    cfg = ModelConfig.named(setting["model"])
    rows = []
    rates = dict(copy_rate=args.copy_rate, matmul_rate=args.matmul_rate, kv_itemsize=1 if args.fp8_kv else 2,
                 weight_itemsize=1 if args.fp8_weights else 2)
    for n in [int(x) for x in args.num_adapters.split(",")]:
        trace = generate_trace(TraceConfig(num_adapters=n, rate=args.rate, duration=args.duration, seed=args.seed))
        ranks = adapter_ranks(n, setting["ranks"])
        labels = np.array([t.adapter or "" for t in trace])
        if not rows:  # lengths and arrivals do not depend on n (same seed): one base-only row
            rows.append({"system": "base-only", "n": 0, **bound(trace, cfg, ranks, args.batch, 0.0, **rates)})
        schedules = [("fcfs", distinct_fcfs(labels, args.batch))] + [
            (f"grouped {q}", distinct_grouped(labels, args.batch, q)) for q in map(int, args.queues.split(","))]
        for name, distinct in schedules:
            rows.append({"system": f"jslora {name}", "n": n, **bound(trace, cfg, ranks, args.batch, distinct, **rates)})
    base = rows[0]["req_s"]
    print(f"{args.setting} ({setting['model']}, ranks {setting['ranks']}), {args.rate:g} req/s for "
          f"{args.duration:g} s, batch {args.batch}; copy {args.copy_rate / 1e12:.2f} TB/s, "
          f"matmul {args.matmul_rate / 1e12:.0f} TFLOP/s")
    print(f"{'system':>16} {'n':>5} {'steps':>6} {'KV TB':>6} {'GEMM TF':>7} {'wts TB':>6} {'adapters':>8} "
          f"{'GB/step':>7} {'LoRA TB':>7} {'device s':>8} {'req/s':>6} {'x base':>6} {'trace/ref':>9}")
    for r in rows:
        print(f"{r['system']:>16} {r['n']:>5} {r['steps']:6.0f} {r['kv_tb']:6.1f} {r['gemm_tflop']:7.0f} "
              f"{r['weights_tb']:6.1f} {r['distinct_per_step']:8.1f} {r['adapter_gb_per_step']:7.2f} "
              f"{r['lora_tb']:7.2f} {r['device_s']:8.2f} {r['req_s']:6.1f} {r['req_s'] / base:6.3f} "
              f"{r['trace_over_reference']:9.3f}")
    return rows


if __name__ == "__main__":
    main()
