"""HF transformers + peft on the same work as benchmarks/engine.py: the baseline to beat.

    PYTHONPATH=. python benchmarks/peft_baseline.py            # GPU: Llama-7B shapes, random weights
    PYTHONPATH=. python benchmarks/peft_baseline.py --quick    # CPU smoke run on the tiny config

Batch --batch, prompt --prompt tokens, --new greedy tokens (EOS never stops it: min_new_tokens), r=16
adapters on q,k,v,o with random weights: base model; one adapter; a batch mixing --adapters adapters
through peft's `adapter_names=` (its multi-adapter inference). Writes $OUT/peft_baseline.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_json
from benchmarks.peft_trace import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.prompt, args.new, args.adapters = "tiny", 4, 8, 4, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, config = build_model(args.model, {f"a{i}": args.rank for i in range(args.adapters)}, device, dtype)
    prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt), device=device)
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    def timed(label, **kw):
        with torch.no_grad():
            model.generate(prompts, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4}, **kw)  # warm, same shapes
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(prompts, **gen, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        new = (out.shape[1] - args.prompt) * args.batch
        return {"case": label, "seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds}

    rows = []
    with model.disable_adapter():
        rows.append(timed("base"))
    model.set_adapter("a0")
    rows.append(timed("one adapter"))
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    rows.append(timed(f"{args.adapters} adapters mixed", adapter_names=names))
    import peft
    import transformers  # noqa: E401

    payload = {"model": args.model, "batch": args.batch, "prompt": args.prompt, "new": args.new, "rank": args.rank,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "peft": peft.__version__, "rows": rows}
    path = write_json("peft_baseline.json", payload)
    print(f"\n{'case':>20} {'tok/s':>8} {'s':>7}")
    for r in rows:
        print(f"{r['case']:>20} {r['tokens_per_s']:8.1f} {r['seconds']:7.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
