"""Tensor parallelism checked on the GPUs it runs on: TP = 2 and 4 against TP = 1 on the same GPU kind,
for one mixed batch (base-model rows and adapters of different ranks and targets), MHA and GQA models.

    PYTHONPATH=. python benchmarks/tp_correctness.py --models llama-7b,llama-3-8b --tp 1,2,4
    PYTHONPATH=. python benchmarks/tp_correctness.py --quantization fp8 --fp8-gemm xla-w8a8   # FP8 under TP
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. python benchmarks/tp_correctness.py --quick

Random weights at the model's shape (`dummy:`, the same for every TP size) and random adapters. Each
request asks for the top-5 logprobs of its prompt positions (teacher-forced, so every position compares
whatever the tokens) and of its greedy decode tokens. Against TP = 1: the largest difference of a top-5
logprob over prompt positions (prefill rows) and over decode steps while the greedy tokens agree, and the
share of greedy tokens that agree. A divergence is allowed only at a near-tie: where TP = 1's top two
logprobs were closer than the tolerance. Writes $OUT/tp_correctness.json; prints a table last.
"""
from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from jslora import LLM, SamplingParams
from jslora.config import ModelConfig
from jslora.loading.peft_adapter import dummy_adapter
from jslora.model.quant import FP8_GEMMS

# name -> (rank, targets): ranks 8-64, attention-only, output-only and MLP-only adapters side by side
ADAPTERS = {"r8-qv": (8, ("q", "v")), "r16-qkvo": (16, ("q", "k", "v", "o")), "r32-o": (32, ("o",)),
            "r64-mlp": (64, ("gate", "up", "down"))}
ROWS = [None, "r8-qv", "r16-qkvo", "r32-o", "r64-mlp", None, "r16-qkvo", "r64-mlp"]


def run(model: str, tp: int, args) -> list:
    cfg = ModelConfig.named(model)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    adapters = {name: dummy_adapter(cfg, rank, targets, seed=i, std=None)
                for i, (name, (rank, targets)) in enumerate(ADAPTERS.items())}
    engine = dict(tensor_parallel_size=tp, max_batch=len(ROWS), max_num_batched_tokens=args.prompt * len(ROWS))
    if jax.default_backend() != "gpu":
        engine["num_pages"] = 4096
    if args.quantization:
        engine["fp8_gemm"] = args.fp8_gemm
    llm = LLM(f"dummy:{model}", adapters, dtype=dtype, max_lora_rank=64, max_model_len=args.prompt + args.tokens + 16,
              engine=engine, quantization=args.quantization)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt).tolist() for _ in ROWS]
    sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    outputs = llm.generate(prompts, ROWS, sp)
    llm.engine.close()
    del llm
    gc.collect()
    return outputs


def top(entry) -> dict[int, float]:
    """A logprobs entry (chosen, top ids, top logprobs) -> {token id: logprob} of its top 5."""
    _, ids, values = entry
    return dict(zip(ids, values))


def compare(base: list, other: list, tolerance: float) -> dict:
    prompt_diff, decode_diff, agree, total, unexplained = 0.0, 0.0, 0, 0, 0
    for a, b in zip(base, other):
        for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            ta, tb = top(ea), top(eb)
            prompt_diff = max(prompt_diff, max(abs(ta[t] - tb[t]) for t in ta.keys() & tb.keys()))
        for i, (ta_id, tb_id) in enumerate(zip(a.token_ids, b.token_ids)):
            total += 1
            la, lb = top(a.logprobs[i]), top(b.logprobs[i])
            decode_diff = max(decode_diff, max(abs(la[t] - lb[t]) for t in la.keys() & lb.keys()))
            if ta_id != tb_id:
                best = sorted(la.values(), reverse=True)
                unexplained += best[0] - best[1] >= tolerance  # not a near-tie: a real disagreement
                break  # later tokens see different contexts
            agree += 1
    return {"prompt_logprob_max_diff": prompt_diff, "decode_logprob_max_diff": decode_diff,
            "greedy_agree": agree / total, "divergences_not_near_ties": unexplained}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-7b,llama-3-8b", help="MHA (llama-7b) and GQA (llama-3-8b)")
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=None, help="logprob tolerance (default: bf16 0.1, f32 1e-3)")
    ap.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 base weights at every TP size")
    ap.add_argument("--fp8-gemm", default="xla", choices=FP8_GEMMS,
                    help="with --quantization fp8: EngineConfig.fp8_gemm")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models, args.prompt, args.tokens, args.tp = "tiny", 24, 6, "1,2"  # tiny: 2 KV heads
    on_gpu = jax.default_backend() == "gpu"
    tolerance = args.tolerance or (0.1 if on_gpu else 1e-3)
    sizes = [t for t in map(int, args.tp.split(",")) if t <= jax.device_count()]
    rows = []
    for model in args.models.split(","):
        t0 = time.perf_counter()
        base = run(model, 1, args)
        for tp in [t for t in sizes if t > 1]:
            row = {"model": model, "tp": tp, **compare(base, run(model, tp, args), tolerance)}
            row["ok"] = (row["prompt_logprob_max_diff"] <= tolerance and row["divergences_not_near_ties"] == 0)
            rows.append(row)
            print(row, flush=True)
        print(f"{model}: {time.perf_counter() - t0:.0f} s", flush=True)
    write_json("tp_correctness.json", {"environment": environment(), "devices": jax.device_count(),
                                       "quantization": args.quantization, "fp8_gemm": args.fp8_gemm,
                                       "tolerance": tolerance, "adapters": ADAPTERS, "rows_adapters": ROWS,
                                       "rows": rows})
    print(f"\n{jax.device_count()} x {jax.devices()[0].device_kind}; tolerance {tolerance} (logprob)")
    print(f"{'model':>12} {'tp':>3} {'prompt max diff':>15} {'decode max diff':>15} {'greedy agree':>12} "
          f"{'real divergences':>16} {'ok':>4}")
    for r in rows:
        print(f"{r['model']:>12} {r['tp']:>3} {r['prompt_logprob_max_diff']:>15.4f} "
              f"{r['decode_logprob_max_diff']:>15.4f} {r['greedy_agree']:>12.2f} "
              f"{r['divergences_not_near_ties']:>16} {'yes' if r['ok'] else 'NO':>4}")
    if not all(r["ok"] for r in rows):
        raise SystemExit("tensor-parallel outputs differ from TP = 1 beyond the tolerance")


if __name__ == "__main__":
    main()
