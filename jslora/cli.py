"""Command line: `jslora generate`, `jslora serve`, `jslora bench`."""
from __future__ import annotations

import argparse
import faulthandler
import signal
import time


def _generate(args) -> None:
    from jslora import LLM, SamplingParams

    adapters = dict(spec.split("=", 1) for spec in args.lora_modules)
    llm = LLM(args.model, adapters, max_lora_rank=args.max_lora_rank)
    names = [None] + sorted(adapters)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate([args.prompt] * len(names), adapter=names, sampling=sampling)
    elapsed = time.perf_counter() - start
    for name, out in zip(names, outputs):
        print(f"[{name or 'base model'}] {args.prompt!r} -> {out.text!r}  ({len(out.token_ids)} tokens)")
    print(f"{sum(len(o.token_ids) for o in outputs)} tokens in {elapsed:.2f} s (including compilation)")


def _convert(args) -> None:
    from jslora.loading.orbax_checkpoint import convert

    start = time.perf_counter()
    out = convert(args.model, args.out, dtype=args.dtype)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s: use it as --model (restored sharded under "
          f"--tensor-parallel-size)")


def main(argv=None) -> None:
    from jslora import __version__

    parser = argparse.ArgumentParser(prog="jslora")
    parser.add_argument("--version", action="version", version=f"jslora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}  # --help shows every default
    gen = sub.add_parser("generate", help="generate text with the base model and each adapter", **defaults)
    gen.add_argument("--model", default="dummy:tiny", help="HF directory or dummy:<config name>")
    gen.add_argument("--lora-modules", nargs="*", default=["a=dummy:8", "b=dummy:16:q,v,gate,down"],
                     help="name=path (PEFT directory) or name=dummy:<rank>[:<targets>]")
    gen.add_argument("--max-lora-rank", type=int, default=64)
    gen.add_argument("--prompt", default="Hello, LoRA!")
    gen.add_argument("--max-tokens", type=int, default=24)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    conv = sub.add_parser("convert", help="convert a HF checkpoint into an orbax one (fast, sharded restarts)",
                          **defaults)
    conv.add_argument("--model", required=True, help="HF model directory")
    conv.add_argument("--out", required=True, help="directory to write (a model directory itself)")
    conv.add_argument("--dtype", default="bfloat16")
    conv.set_defaults(func=_convert)
    from jslora.serve import add_serve_arguments, serve

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server", **defaults)
    add_serve_arguments(srv)
    srv.set_defaults(func=serve)
    from jslora.bench.cli import add_bench_arguments, run_bench

    bench = sub.add_parser("bench", help="replay S-LoRA's synthetic trace; throughput, latency, SLO, baselines",
                           **defaults)
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    args = parser.parse_args(argv)
    # a process killed by `timeout` or a supervisor (SIGTERM) first prints every thread's Python stack:
    # a hung warm-up or step leaves evidence of where it hung
    try:
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    except (AttributeError, OSError, ValueError):  # stderr is not a file (main() called under a capture)
        pass
    try:
        args.func(args)
    except FileNotFoundError as e:  # a wrong --model path: one clear line, not a traceback
        parser.exit(2, f"jslora {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
