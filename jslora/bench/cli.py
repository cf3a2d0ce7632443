"""`jslora bench`: replay S-LoRA's synthetic trace against jslora (in-process or over HTTP) and its
baselines, sweeping the number of adapters and the request rate; JSON results and PNG plots.

    jslora bench --quick                                       # tiny model on the CPU, seconds
    jslora bench --setting S1 --num-adapters 5,100,1000,2000 --rate 10 --duration 120
    jslora bench --setting S2 --systems jslora,base-only,bmm --num-adapters 5,100 --rate 10,40
    jslora bench --url http://127.0.0.1:8000 --model dummy:tiny --num-adapters 3   # a running server
"""
from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import time
from pathlib import Path

from jslora import compilation_cache
from jslora.engine import serving_process
from jslora.engine.config import HOST_ADAPTER_MEMORIES, EngineConfig, add_step_arguments, step_options


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _range(text: str) -> tuple[int, int]:
    lo, hi = _ints(text)
    return lo, hi


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", default=None, help="S-LoRA setting S1..S6: base model and adapter ranks")
    p.add_argument("--model", default=None, help="dummy:<config name> (default: the setting's model)")
    p.add_argument("--ranks", default=None, help="adapter ranks, comma-separated (default: the setting's)")
    p.add_argument("--num-adapters", default="5,100", help="sweep, comma-separated")
    p.add_argument("--rate", default="10", help="requests per second; sweep, comma-separated")
    p.add_argument("--cv", default="1", help="burstiness (1 = Poisson); sweep, comma-separated")
    p.add_argument("--alpha", type=float, default=1.0, help="adapter popularity power law (1 = uniform)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--input-range", type=_range, default=(8, 512))
    p.add_argument("--output-range", type=_range, default=(8, 512))
    p.add_argument("--shared-prefix", type=_range, default=None, metavar="LOW,HIGH",
                   help="each adapter's requests start with its own system prompt of LOW..HIGH tokens "
                        "(the prefix-caching workload; --input-range is then the user turn)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--slo", type=float, default=6.0, help="first-token SLO in seconds")
    p.add_argument("--systems", default="jslora", help="comma-separated: jslora, base-only, bmm, peft-style, "
                                                       "no-unified, merged")
    p.add_argument("--scheduling-policy", default="fcfs",
                   help="policy of the jslora system; comma-separated to compare policies on one engine")
    p.add_argument("--url", default=None, help="replay against this running server instead (jslora only)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 base weights (adapters stay bf16)")
    add_step_arguments(p)
    p.add_argument("--no-lora-communication", action="store_true",
                   help="under TP, skip LoRA's all-gathers (wrong outputs; measures what they cost)")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_batch)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="rows per step: decode rows plus prompt chunks (chunked prefill)")
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--host-adapter-gb", type=float, default=32.0, help="host-RAM adapter tier")
    p.add_argument("--adapter-load-workers", type=int, default=4,
                   help="threads reading adapters from disk into host RAM (EngineConfig.adapter_load_workers)")
    p.add_argument("--adapter-prefetch-depth", type=int, default=8,
                   help="queued requests whose adapters are read and copied ahead of admission "
                        "(EngineConfig.prefetch_depth)")
    p.add_argument("--adapter-load-processes", type=int, default=None,
                   help="worker processes those threads hand each read to, so it holds none of the engine's "
                        "GIL (0: the threads read; default: 8 on a GPU, 0 on the CPU; "
                        "EngineConfig.adapter_load_processes)")
    p.add_argument("--host-adapter-memory", default="pageable", choices=HOST_ADAPTER_MEMORIES,
                   help="where the host tier keeps adapters: pageable (NumPy), pinned (page-locked: one DMA to "
                        "the GPU, slower in the engine on the H200; EngineConfig.host_adapter_memory)")
    p.add_argument("--gil-switch-interval", type=float, default=None,
                   help="seconds a thread may hold the GIL while another waits (sys.setswitchinterval; default: "
                        "CPython's 0.005; jslora.engine.serving_process.settle)")
    p.add_argument("--max-adapters", type=int, default=1024, help="adapters resident in the pool at once")
    p.add_argument("--adapter-dir", default=None,
                   help="write the adapters as PEFT directories here (reused if present) and serve them from "
                        "disk, read on first use, instead of generating dummy ones")
    p.add_argument("--adapter-distinct-files", type=int, default=None,
                   help="with --adapter-dir: weight files written per rank; the other directories hard-link them")
    p.add_argument("--preload", action="store_true",
                   help="read every adapter into host RAM before the runs (S-LoRA keeps them in host memory); "
                        "otherwise they are read (dummy: generated) on first use, inside the timed runs")
    p.add_argument("--profile-window", type=_floats, default=None, metavar="START,SECONDS",
                   help="profile that window of each run (GPU busy share, time per step program)")
    p.add_argument("--host-profile", action="store_true",
                   help="cProfile the engine loop of each run (slows it): its top functions go into bench.json")
    p.add_argument("--no-reference-step", action="store_true",
                   help="skip timing the engine's plain decode at each run's average batch and context after it "
                        "(the trace's output tok/s is reported against it: trace_over_reference)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_results"),
                   help="folder for bench.json and the plots (default: $OUT where set, as benchmarks/ writes)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny model, short trace (CPU smoke run)")
    compilation_cache.add_argument(p)


def _apply_quick(args) -> None:
    args.model, args.ranks = args.model or "dummy:tiny", args.ranks or "4,8"
    args.duration, args.input_range, args.output_range = min(args.duration, 3.0), (4, 24), (2, 12)
    args.max_model_len, args.max_num_batched_tokens, args.max_num_seqs = 128, 256, 16
    args.num_pages = args.num_pages or 4096
    if args.num_adapters == "5,100":
        args.num_adapters = "2,6"
    if args.rate == "10":
        args.rate = "6"


def run_bench(args) -> dict:
    import concurrent.futures

    import jax

    from jslora.bench.metrics import summarize
    from jslora.bench.reference import decode_context, decode_rate
    from jslora.bench.replay import replay_engine, replay_http
    from jslora.bench.systems import build_system, delta, engine_counters, free
    from jslora.bench.timeline import GcPauses, device_activity, summarize_timeline
    from jslora.bench.trace import TraceConfig, adapter_ranks, generate_trace
    from jslora.config import ModelConfig, slora_setting
    from jslora.loading.model import load_model

    if args.quick:
        _apply_quick(args)
    started = time.perf_counter()

    def stage(message: str) -> None:  # start-up can take minutes: a run cut short shows where it was
        print(f"[bench +{time.perf_counter() - started:.0f} s] {message}", flush=True)

    compilation_cache.enable(args.compilation_cache_dir)
    setting = slora_setting(args.setting) if args.setting else {"model": "tiny", "ranks": [8]}
    model = (args.model or f"dummy:{setting['model']}").removeprefix("dummy:")
    ranks = _ints(args.ranks) if args.ranks else setting["ranks"]
    counts, rates, cvs = _ints(args.num_adapters), _floats(args.rate), _floats(args.cv)
    systems = [s for s in args.systems.split(",") if s]
    cfg = ModelConfig.named(model)
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the longest request must fit the context: fail now, not after minutes of loading and compiling
    prefix = args.shared_prefix[1] - 1 if args.shared_prefix else 0
    longest = prefix + args.input_range[1] - 1 + args.output_range[1] - 1
    max_len = min(args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if longest > max_len:
        raise SystemExit(f"jslora bench: the trace's longest request ({longest} tokens: prefix, prompt and output "
                         f"ranges) exceeds {model}'s context of {max_len} tokens")
    names = adapter_ranks(max(counts), ranks)
    if args.adapter_dir:  # real files, read from disk on first use
        from jslora.bench.adapter_files import write_peft_adapters

        stage(f"writing {len(names)} PEFT adapter directories under {args.adapter_dir}")
        specs = write_peft_adapters(args.adapter_dir, names, cfg, distinct=args.adapter_distinct_files,
                                    progress=progress)
    else:
        specs = {name: f"dummy:{rank}" for name, rank in names.items()}
    rows, latencies = [], {}
    payload = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "model": model, "ranks": ranks,
               "environment": _environment(), "rows": rows}

    def save():  # after every run: a sweep cut short keeps what it measured
        (out / "bench.json").write_text(json.dumps(payload, indent=1, default=str))

    def record(system, n, rate, cv, records, wall, extra):
        row = {"system": system, "num_adapters": n, "rate": rate, "cv": cv, "alpha": args.alpha,
               "duration": args.duration, **summarize(records, wall, args.slo), **extra}
        if extra.get("reference_decode") and row.get("throughput_steady_tok_s"):
            row["trace_over_reference"] = row["throughput_steady_tok_s"] / extra["reference_decode"]["tok_s"]
        if extra.get("prefix_cache_queried_tokens"):
            row["prefix_cache_hit_rate"] = extra["prefix_cache_hit_tokens"] / extra["prefix_cache_queried_tokens"]
        rows.append(row)
        latencies[(system, n, rate, cv)] = records
        save()
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    def trace_for(n, rate, cv):
        return generate_trace(TraceConfig(num_adapters=n, alpha=args.alpha, rate=rate, cv=cv, duration=args.duration,
                                          input_range=args.input_range, output_range=args.output_range,
                                          seed=args.seed, shared_prefix=args.shared_prefix))

    if args.url:
        for n, rate, cv in itertools.product(counts, rates, cvs):
            records, wall = replay_http(args.url, trace_for(n, rate, cv), base_model=model,
                                        vocab_size=cfg.vocab_size, api_key=args.api_key, progress=progress)
            record("jslora-http", n, rate, cv, records, wall, {})
    else:
        stage(f"loading {model} (random weights)")
        loaded = load_model(f"dummy:{model}", "auto", tensor_parallel_size=args.tensor_parallel_size)
        params, dtype = loaded.params, jax.tree_util.tree_leaves(loaded.params)[0].dtype
        base = EngineConfig(max_batch=args.max_num_seqs, max_model_len=args.max_model_len,
                            max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_lora_rank=max(16, max(ranks)),
                            max_adapters=args.max_adapters, host_adapter_bytes=int(args.host_adapter_gb * 2**30),
                            host_adapter_memory=args.host_adapter_memory,
                            adapter_load_workers=args.adapter_load_workers, prefetch_depth=args.adapter_prefetch_depth,
                            adapter_load_processes=args.adapter_load_processes,
                            lora_targets=("q", "k", "v", "o"), slo_s=args.slo,
                            tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
                            **step_options(args))
        policies = [p for p in args.scheduling_policy.split(",") if p]
        for system in systems:
            engine = None
            try:
                t0 = time.perf_counter()
                stage(f"{system}: building the engine and compiling its steps")
                engine = build_system(system, params, cfg, dtype, base, specs,
                                      lora_communication=not args.no_lora_communication)
                uses_store = hasattr(engine, "store") and system != "base-only"
                with concurrent.futures.ThreadPoolExecutor(1) as background:
                    # adapters packed into host RAM on host threads while the steps compile (minutes on a GPU)
                    preloading = background.submit(engine.store.preload, list(specs)) \
                        if args.preload and uses_store else None
                    # the replay's requests are greedy: the top-k/top-p sampler's variants are never launched
                    # (one that were would compile and show in the timeline's compiles)
                    compile_s = engine.warmup(filtered=False)
                    t1 = time.perf_counter()
                    stage(f"{system}: steps compiled in {compile_s:.0f} s" + (", waiting for the preload"
                                                                              if preloading is not None else ""))
                    preloaded = preloading.result() if preloading is not None else 0
                serving_process.settle(args.gil_switch_interval)
                # preload_s: how long the preload outlasted the warm-up
                setup = {"setup_s": time.perf_counter() - t0, "compile_s": compile_s, "preloaded": preloaded,
                         "preload_s": time.perf_counter() - t1}
                # the trace's arrivals and lengths do not depend on n (same seed), so the base model,
                # which ignores the adapters, needs one run
                for n in counts[:1] if system == "base-only" else counts:
                    served = getattr(engine, "engines", None)
                    if served is not None and n > len(served):
                        rows.append({"system": system, "num_adapters": n,
                                     "skipped": f"only {len(served)} merged copies fit"})
                        print(f"{system} n={n}: skipped, only {len(served)} merged copies fit", flush=True)
                        continue
                    for rate, cv, policy in itertools.product(rates, cvs, policies if system == "jslora" else [None]):
                        label = f"{system}/{policy}" if policy is not None and len(policies) > 1 else system
                        if policy is not None:
                            engine.set_policy(policy)
                        if getattr(engine, "prefix_cache", None) is not None:
                            engine.reset_prefix_cache()  # each run starts cold: runs replay the same prompts
                        before = engine_counters(engine)
                        adapter_of = (lambda t: None) if system == "base-only" else (lambda t: t.adapter)
                        timeline = getattr(engine, "timeline", False) is not False
                        if timeline:
                            engine.timeline = []
                        profile_dir = str(out / f"profile_{label}_{n}_{rate:g}")
                        profile = (*args.profile_window, profile_dir) if args.profile_window else None
                        host_profile = cProfile.Profile() if args.host_profile else None
                        if host_profile is not None:
                            host_profile.enable()
                        trace = trace_for(n, rate, cv)
                        stage(f"{label} n={n}: replaying {len(trace)} requests at {rate:g} req/s")
                        with GcPauses() as gc_pauses:
                            # without the bar, a line every 15 s: a log cut short tells a stall from a slow run
                            report = None if progress else \
                                (lambda line, label=label, n=n: stage(f"{label} n={n}: {line}"))
                            records, wall = replay_engine(engine, trace, progress=progress, seed=args.seed,
                                                          adapter_of=adapter_of, profile=profile, report=report)
                        steps = summarize_timeline(engine.timeline, wall) if timeline else {}
                        if steps.get("steps"):
                            steps |= {"gc_ms_per_step": gc_pauses.seconds * 1e3 / steps["steps"],
                                      "gc_collections": gc_pauses.collections}
                        if host_profile is not None:
                            host_profile.disable()
                            steps["host_profile"] = top_functions(host_profile)
                        if profile:
                            steps |= device_activity(profile_dir)
                        scheduler = getattr(engine, "scheduler", None)  # merged: several engines
                        extra = {**setup, "policy": scheduler.policy.name if scheduler else "fcfs",
                                 **delta(engine_counters(engine), before), "timeline": steps}
                        if not args.no_reference_step and scheduler is not None and steps.get("steps"):
                            # the same engine, warm: its plain decode at the run's batch and context
                            adapters = list(dict.fromkeys(adapter_of(t) for t in trace))
                            extra["reference_decode"] = decode_rate(
                                engine, steps["running_batch_avg"], decode_context(trace), adapters, cfg.vocab_size)
                        record(label, n, rate, cv, records, wall, extra)
            except Exception as e:  # noqa: BLE001 - one failing system must not lose the others' results
                import traceback

                traceback.print_exc()
                rows.append({"system": system, "error": f"{type(e).__name__}: {e}"})
                save()
            finally:
                if engine is not None:
                    free(engine)
                engine = None

    save()
    if not args.no_plots:
        from jslora.bench.plots import plot_latency_cdf, plot_throughput

        plot_throughput(rows, out / "throughput_vs_adapters.png")
        plot_latency_cdf(latencies, out / "first_token_latency_cdf.png")
    _print_table(rows)
    _print_timeline(rows)
    print(f"wrote {out / 'bench.json'}")
    return payload


def top_functions(profile, count: int = 30) -> dict:
    """The profile's heaviest functions by own time and by cumulative time: {order: [(function,
    calls, own s, cumulative s)]}."""
    import pstats

    stats = pstats.Stats(profile).stats
    rows = [(f"{pstats.func_std_string(func)}", calls, own, cumulative)
            for func, (_, calls, own, cumulative, _) in stats.items()]
    return {"own": sorted(rows, key=lambda r: -r[2])[:count], "cumulative": sorted(rows, key=lambda r: -r[3])[:count]}


def _environment() -> dict:
    import platform

    import jax

    from jslora.provenance import commit

    device = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(), "commit": commit(),
            "device": getattr(device, "device_kind", str(device)),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'system':>12} {'n':>5} {'rate':>5} {'cv':>3} {'req/s':>6} {'tok/s':>7} {'lat avg':>7} {'lat p99':>7} "
          f"{'ttft avg':>8} {'ttft p99':>8} {'SLO':>5} {'satisf':>6} {'dropped':>7}")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['system']:>12} {r.get('num_adapters', ''):>5}  {r.get('skipped') or r['error']}")
            continue
        print(f"{r['system']:>12} {r['num_adapters']:>5} {r['rate']:>5g} {r['cv']:>3g} {r['throughput_req_s']:6.2f} "
              f"{r['throughput_tok_s']:7.0f} {r['latency_avg_s']:7.2f} {r['latency_p99_s']:7.2f} "
              f"{r['first_token_avg_s']:8.2f} {r['first_token_p99_s']:8.2f} {r['slo_attainment']:5.2f} "
              f"{r['user_satisfaction']:6.2f} {r['dropped']:>7}")


def _print_timeline(rows: list[dict]) -> None:
    timed = [r for r in rows if r.get("timeline", {}).get("steps")]
    if not timed:
        return
    print(f"\n{'system':>12} {'n':>5} {'rate':>5} {'steps/s':>7} {'batch':>6} {'adapters':>8} {'w/ pf':>6} {'pad':>5} "
          f"{'host ms':>7} {'p99 ms':>6} {'unwait':>6} {'disp ms':>7} {'gc ms':>5} {'host':>5} {'wait':>5} "
          f"{'out ms':>6} {'gpu busy':>8} {'compiles':>8} {'ref tok/s':>9} {'trace/ref':>9}")
    for r in timed:
        ref, ratio = r.get("reference_decode"), r.get("trace_over_reference")
        ref_tok_s = "-" if ref is None else f"{ref['tok_s']:.0f}"
        t = r["timeline"]
        busy = t.get("gpu_busy_share")
        print(f"{r['system']:>12} {r['num_adapters']:>5} {r['rate']:>5g} {t['steps_per_s']:7.1f} "
              f"{t['running_batch_avg']:6.1f} {t.get('distinct_adapters_avg', 0):8.1f} "
              f"{t['steps_with_prefill_share']:6.2f} {t['padding_share']:5.2f} "
              f"{t['host_ms_per_step']:7.2f} {t.get('host_ms_p99', 0):6.1f} {t.get('unwaited_share', 0):6.3f} "
              f"{t.get('dispatch_ms_per_step', 0):7.2f} {t.get('gc_ms_per_step', 0):5.2f} "
              f"{t['host_share']:5.2f} {t['wait_share']:5.2f} "
              f"{t['outside_engine_ms_per_step']:6.2f} {'-' if busy is None else f'{busy:.2f}':>8} {t['compiles']:>8} "
              f"{ref_tok_s:>9} {'-' if ratio is None else f'{ratio:.2f}':>9}")
    for r in timed:  # where a profiled run's GPU idled (timeline.device_activity)
        t = r["timeline"]
        if t.get("idle_s_between"):
            idle = t["window_s"] - t["gpu_busy_s"]
            print(f"\n{r['system']} n={r['num_adapters']}: GPU idle {idle * 1e3:.1f} ms of the {t['window_s']:.1f}-s "
                  f"window, {t['idle_s_launched_in_gap'] * 1e3:.1f} ms of it waiting for a launch; largest gaps:")
            for before, after, n, seconds in t["idle_s_between"][:5]:
                print(f"  {seconds * 1e3:7.1f} ms in {n:5d} gaps  after {before}  before {after}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="jslora bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()
