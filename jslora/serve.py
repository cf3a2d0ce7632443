"""`jslora serve` / `python -m jslora.serve`: the OpenAI-compatible server (flag names as vLLM's)."""
from __future__ import annotations

import argparse
import logging
import socket

from jslora import compilation_cache
from jslora.engine import serving_process
from jslora.engine.config import EngineConfig, add_step_arguments, step_options


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or dummy:<config name>")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API")
    p.add_argument("--lora-modules", nargs="*", default=[],
                   help="name=path (PEFT directory) or name=dummy:<rank>[:targets]")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_batch, help="running requests at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="rows per step: decode rows plus prompt chunks (longer prompts are split over steps)")
    p.add_argument("--max-num-waiting", type=int, default=1024, help="queued requests before 503")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-pages", type=int, default=None, help="pool pages (default: from GPU memory)")
    p.add_argument("--max-request-body-bytes", type=int, default=8 << 20,
                   help="larger request bodies get a 413 before they are parsed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--lora-root", default=None,
                   help="directory of PEFT adapter directories: load_lora_adapter may load from it, and with "
                        "--lora-resolver a request naming <root>/<model> loads it on first use")
    p.add_argument("--lora-resolver", action="store_true",
                   help="load an unknown model name from --lora-root/<name> on its first request")
    p.add_argument("--max-loras", type=int, default=1024, help="adapters resident on the GPU (in the pool) at once")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host RAM (default: as many as --host-adapter-gb holds)")
    p.add_argument("--host-adapter-gb", type=float, default=16.0, help="host-RAM adapter tier budget")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    p.add_argument("--scheduling-policy", default="fcfs",
                   help="fcfs, newest, slo-abort, vtc, adapter-aware[:<window>][+<policy>]")
    p.add_argument("--slo", type=float, default=6.0, help="first-token SLO in seconds (slo-abort)")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: base weights in FP8 e4m3 with per-output-channel scales (adapters stay in dtype)")
    add_step_arguments(p)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt blocks already computed for the same adapter version")
    p.add_argument("--no-warmup", action="store_true", help="compile step shapes on first use")
    compilation_cache.add_argument(p)
    p.add_argument("--demo", action="store_true", help="tiny dummy model with dummy adapters (runs on CPU)")


def build_app(args):
    from jslora import LLM
    from jslora.server.app import create_app

    compilation_cache.enable(args.compilation_cache_dir)
    if args.demo:
        args.model = args.model or "dummy:tiny"
        args.lora_modules = args.lora_modules or ["a=dummy:8", "b=dummy:16:q,v,gate,down", "c=dummy:4:q,k,v,o,up"]
        args.max_lora_rank = min(args.max_lora_rank, 16)
        args.max_model_len = args.max_model_len or 256
        args.max_num_seqs = min(args.max_num_seqs, 32)
        args.num_pages = args.num_pages or 8192
        logging.getLogger("jslora.server").warning(
            "--demo: model %s, adapters %s, --max-lora-rank %d, --max-model-len %d, --max-num-seqs %d, "
            "--num-pages %d (a CPU-sized server; the flags given explicitly set the bounds)", args.model,
            " ".join(args.lora_modules), args.max_lora_rank, args.max_model_len, args.max_num_seqs, args.num_pages)
    if not args.model:
        raise SystemExit("--model is required (or --demo)")
    if args.lora_resolver and not args.lora_root:
        raise SystemExit("--lora-resolver needs --lora-root (the directory adapters are resolved in)")
    adapters = {}
    for spec in args.lora_modules:
        if "=" not in spec:
            raise SystemExit(f"--lora-modules entries are name=path, got {spec!r}")
        name, path = spec.split("=", 1)
        adapters[name] = path
    engine = EngineConfig(max_batch=args.max_num_seqs, num_pages=args.num_pages, policy=args.scheduling_policy,
                          slo_s=args.slo,
                          tensor_parallel_size=args.tensor_parallel_size,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          max_num_batched_tokens=min(args.max_num_batched_tokens, 256) if args.demo
                          else args.max_num_batched_tokens, max_adapters=args.max_loras,
                          max_host_adapters=args.max_cpu_loras, host_adapter_bytes=int(args.host_adapter_gb * 2**30),
                          enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
                          **step_options(args))
    llm = LLM(args.model, adapters, max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len,
              engine=engine, warmup=not args.no_warmup)
    serving_process.settle()
    name = args.served_model_name or (args.model.removeprefix("dummy:") if args.model.startswith("dummy:")
                                      else args.model.rstrip("/").split("/")[-1])
    return create_app(llm, model_name=name, api_key=args.api_key, lora_root=args.lora_root,
                      lora_resolver=args.lora_resolver,
                      max_waiting=args.max_num_waiting, max_body_bytes=args.max_request_body_bytes)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (as vLLM): a port in use fails in a second,
    not after minutes of loading and compiling."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"jslora serve: error: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(args) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(args.host, args.port)
    app = build_app(args)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="jslora serve", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(args)
    except FileNotFoundError as e:  # a wrong --model path: one clear line, not a traceback
        parser.exit(2, f"jslora serve: error: {e}\n")


if __name__ == "__main__":
    main()
