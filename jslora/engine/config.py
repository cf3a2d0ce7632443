"""Engine options (a dataclass; JSON files under configs/engine/ hold presets)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from jslora.config import CONFIG_DIR, LORA_TARGETS
from jslora.model.quant import DEFAULT_FP8_GEMM
from jslora.scheduler.rows import COMPUTE_BOUND_ROWS
from pallas_kernels.pool import TILE

HOST_ADAPTER_MEMORIES = ("pageable", "pinned")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # running requests (decode rows) at once (vLLM's max_num_seqs). 384 over 256 at S1 on an H100 (60 s, both orders):
    # +4.1% req/s over the run, +1.3% steady, first tokens 40% sooner, each request's tokens 17% slower (fewer
    # steps a second); benchmarks/RESULTS.md, forty-first session. Latency-bound serving sets it lower
    max_batch: int = 384
    max_model_len: int | None = None     # None: the model's max_position_embeddings
    max_num_batched_tokens: int = 2048   # rows per step: decode rows + prompt chunks (chunked prefill)
    num_pages: int | None = None         # pool pages; None: from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    kv_block: int = TILE                 # pages per allocation block
    max_lora_rank: int = 64
    max_adapters: int = 1024             # adapters resident in the pool at once
    host_adapter_bytes: int = 16 << 30   # host-RAM tier budget
    max_host_adapters: int | None = None  # adapters kept in host RAM at most (None: bytes bound only)
    # where the host tier keeps adapters: "pageable" (NumPy) or "pinned" (page-locked host memory: one DMA
    # to the device, but slower in the engine on the H200: adapter_store.host_tier_memory)
    host_adapter_memory: str = "pageable"
    lora_targets: tuple[str, ...] | None = None  # fixed LoRA targets; None: those of registered adapters
    # the Backend (jslora.model.backend): pallas or reference. None: JSLORA_KERNELS, else pallas (as vLLM's
    # VLLM_ATTENTION_BACKEND; the CPU test suite runs engines on reference unless a test asks for pallas),
    # and pallas under tensor parallelism, where the reference LoRA does not run
    kernels: str | None = None
    policy: str = "fcfs"                 # fcfs, newest, slo-abort, vtc, adapter-aware[:<window>][+<policy>]
    slo_s: float = 6.0                   # first-token SLO of the slo-abort policy
    watermark: float = 0.01              # share of the pool admission keeps free for decoding growth
    prefetch_depth: int = 8              # queued requests whose adapters are prefetched
    # steps launched before the oldest one's tokens are read: 1, the host builds step n+1 while the device
    # runs step n; 2 gives the host two steps' time for one slow iteration (S1 on the H200: 3-5% of the
    # host's iterations outlast a step, ~4 ms of idle GPU each; benchmarks/RESULTS.md, thirtieth session),
    # at one more step before a finished request's slot and blocks are freed. Experimental: an S1 run on the
    # H200 with 2 did not finish in 300 s (thirty-second session), while the CPU's tests and trace pass
    steps_in_flight: int = 1
    adapter_load_workers: int = 4        # threads reading adapters from disk into host RAM
    # worker processes those threads hand each read (parse, scale, check, pack) to, so it holds none of
    # the engine process's GIL (jslora.engine.adapter_reader; S1 with 10,000 adapters on disk, H200: 0.73x
    # -> 0.94x the 5-adapter throughput with 8); 0: the threads read; None: 8 on a GPU (at most half the
    # cores), 0 on the CPU (the test suite's engines read few adapters)
    adapter_load_processes: int | None = None
    decode_lora_tile: int = TILE         # decode rows per LoRA tile, grouped by adapter (1: a tile per row)
    # the tiling of the LoRA kernels that take the decode rows (and a mixed step's prompt rows with them),
    # over jslora.model.backend.lora_tiling: keywords of pallas_kernels.lora.lora_apply_group
    # (benchmarks/lora_tune.py times them), e.g. {"k_splits": 1}
    decode_lora_tiling: dict | tuple | None = None
    tensor_parallel_size: int = 1        # devices the weights, heads and pool columns are split over
    enable_prefix_caching: bool = True   # keep full prompt blocks for reuse, keyed by adapter version
    quantization: str | None = None      # "fp8": FP8 base weights, per-output-channel scales (LoRA stays bf16)
    fp8_gemm: str = DEFAULT_FP8_GEMM     # FP8 projections: "xla-w8a8" (activations quantized per row, FP8
                                         # x FP8: the default, why in jslora.model.quant), "xla" (weights
                                         # up-cast, bf16 activations), "auto" (the second below 64 rows,
                                         # the first from 64: a request's numerics then depend on the
                                         # step's size), "pallas" and "pallas-w8a8" (our kernel up to 64
                                         # rows, the same numerics as "xla" and "xla-w8a8")
    compile_threads: int = 0             # warm-up compiles this many step variants at once (ModelRunner.warmup);
                                         # 0: up to 8 on a GPU (S1's 20 variants: 146 s one at a time, 88 s
                                         # eight at a time on the H200), up to 2 on the CPU (the demo
                                         # server's cold start: 172-202 s one at a time, 120 s two)
    enforce_eager: bool = False          # as vLLM names it: no CUDA graphs; XLA launches the step's kernels
                                         # one by one (no graph to update when the metadata's buffers move)
    pdl: bool = True                     # programmatic dependent launch between the step's XLA kernels
                                         # (Hopper+; jslora.model.paged: 7-11% off a batch-1 step on the H200)
    xla_rematerialization: bool = False  # XLA's rematerialization pass over the step: off, since it cannot
                                         # meet its memory limit beside the pool and clones GEMMs trying
                                         # (jslora.model.paged)
    concurrent_graphs: bool = False      # experimental: the step's CUDA graph ordered by data alone, so
                                         # independent kernels may overlap; other rounding than the
                                         # default order (jslora.model.paged says why it stays off)
    fused_rope: bool = False             # rope and the K/V write in one kernel a layer (pallas_kernels.rope_kv)
                                         # instead of XLA's two rope fusions and the write; no gain on an H200
    fused_norm: bool = False             # each residual add and RMSNorm in one kernel (pallas_kernels.rms_norm)
                                         # instead of XLA's add, reduce and multiply; no gain on an H200
    # "auto": keys and values in the model's dtype; "fp8" (vLLM's name): float8 e4m3, scale 1, a token's key
    # and value packed into one page (pallas_kernels.kv_fp8): half the pages and half the bytes attention
    # reads (13% off attention at batch 256 on an H200: benchmarks/RESULTS.md, twenty-seventh session)
    kv_cache_dtype: str = "auto"
    # the row counts the step is compiled for (each a CUDA graph; a step's rows are padded up to the next one),
    # as vLLM's cudagraph_capture_sizes: decode-only steps (up to max_batch) and steps with prompt chunks (up
    # to max_num_batched_tokens, multiples of TILE). None: sizes.default_buckets (a quarter-octave apart
    # where the matmuls are compute-bound, so padding costs their time in proportion)
    decode_buckets: tuple[int, ...] | None = None
    step_buckets: tuple[int, ...] | None = None
    # a step with prompt chunks whose rows would be padded up to a bucket, where the bucket below has at least
    # this many rows, launches that bucket instead: its last chunk is cut to fit and the rest is a later step's
    # (Scheduler._fit_to_bucket). From 256 rows (where padding costs matmul time): S1 +0.8%, its padding 9% -> 4%
    # of the launched rows, first tokens 4% sooner (H100; benchmarks/RESULTS.md, thirty-ninth session). 0: off
    fit_chunks_from: int = COMPUTE_BOUND_ROWS

    def __post_init__(self):
        from jslora.model.backend import BACKENDS
        if self.kernels is None:
            default = os.environ.get("JSLORA_KERNELS", "pallas") if self.tensor_parallel_size == 1 else "pallas"
            object.__setattr__(self, "kernels", default)
        if self.kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {sorted(BACKENDS)} (jslora.model.backend), got {self.kernels!r}")
        if self.kernels != "pallas" and self.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size > 1 runs LoRA on the Pallas kernels only, not {self.kernels!r}")
        for name in ("max_batch", "max_num_batched_tokens", "kv_block", "max_lora_rank", "max_adapters",
                     "tensor_parallel_size", "steps_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be 0 or more, got {self.prefetch_depth}")
        from jslora.scheduler.policies import make_policy
        make_policy(self.policy)  # an unknown name fails here, at start-up
        if self.kv_block != TILE:  # pallas_kernels.pool.TILE: one KV block per prefill tile
            raise ValueError(f"kv_block must be {TILE}: one KV block per prefill tile")
        if self.decode_lora_tile not in (1, TILE):
            raise ValueError(f"decode_lora_tile must be 1 or {TILE}, got {self.decode_lora_tile}")
        from jslora.model.quant import FP8_GEMMS, QUANTIZATIONS
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {FP8_GEMMS}, got {self.fp8_gemm!r}")
        if self.host_adapter_memory not in HOST_ADAPTER_MEMORIES:
            raise ValueError(f"host_adapter_memory must be one of {HOST_ADAPTER_MEMORIES}, "
                             f"got {self.host_adapter_memory!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.compile_threads < 0:
            raise ValueError(f"compile_threads must be >= 0 (0: automatic), got {self.compile_threads}")
        if self.adapter_load_workers < 1:
            raise ValueError(f"adapter_load_workers must be >= 1, got {self.adapter_load_workers}")
        if self.adapter_load_processes is not None and self.adapter_load_processes < 0:
            raise ValueError(f"adapter_load_processes must be >= 0 (None: automatic), got "
                             f"{self.adapter_load_processes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.fit_chunks_from < 0:
            raise ValueError(f"fit_chunks_from must be a row count, or 0 (off), got {self.fit_chunks_from}")
        for name, multiple in (("decode_buckets", 1), ("step_buckets", TILE)):
            shapes = getattr(self, name)
            if shapes is None:
                continue
            shapes = tuple(shapes)
            if not shapes or any(not isinstance(n, int) or n < 1 or n % multiple for n in shapes):
                raise ValueError(f"{name} must be positive row counts" + (f", multiples of {TILE}" if multiple > 1
                                                                         else "") + f", got {shapes}")
            object.__setattr__(self, name, tuple(sorted(set(shapes))))  # hashable
        if self.decode_lora_tiling is not None:
            from jslora.model.backend import DECODE_LORA_OPTIONS
            tiling = dict(self.decode_lora_tiling)
            bad = set(tiling) - set(DECODE_LORA_OPTIONS)
            if bad:
                raise ValueError(f"decode_lora_tiling options {sorted(bad)} are not among {DECODE_LORA_OPTIONS}")
            object.__setattr__(self, "decode_lora_tiling", tuple(sorted(tiling.items())))  # hashable
        if self.lora_targets is not None:
            bad = set(self.lora_targets) - set(LORA_TARGETS)
            if bad:
                raise ValueError(f"lora_targets {sorted(bad)} are not among {LORA_TARGETS}")
            object.__setattr__(self, "lora_targets", tuple(t for t in LORA_TARGETS if t in self.lora_targets))

    @property
    def kv_pages_per_token(self) -> int:
        """Pool pages a token's key and value take: 2 (a page each), 1 with an FP8 cache (one page both)."""
        return 1 if self.kv_cache_dtype == "fp8" else 2

    @classmethod
    def from_dict(cls, d: dict) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> EngineConfig:
        path = Path(path)
        if not path.exists():
            path = CONFIG_DIR / "engine" / f"{path}.json"
        return cls.from_dict(json.loads(path.read_text()))


def add_step_arguments(parser) -> None:
    """How the step computes and compiles: --fp8-gemm, --enforce-eager, --no-pdl, --xla-rematerialization,
    --concurrent-graphs, --fused-rope, --fused-norm, --kv-cache-dtype, --decode-lora-tile, --decode-lora-tiling,
    --steps-in-flight, --compile-threads, --decode-buckets and --step-buckets,
    for every command line that builds an engine (serve, bench, benchmarks/engine.py; step_options reads them
    back)."""
    from jslora.model.quant import FP8_GEMMS

    parser.add_argument("--fp8-gemm", default=DEFAULT_FP8_GEMM, choices=FP8_GEMMS,
                        help="how FP8 projections multiply: xla-w8a8 (default: activations quantized per row, "
                             "FP8 x FP8), xla (weights up-cast, bf16 activations), auto (xla below 64 rows, "
                             "xla-w8a8 from 64), pallas / pallas-w8a8 (our kernel for steps up to 64 rows)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: XLA launches the step's kernels one by one (EngineConfig.enforce_eager)")
    parser.add_argument("--no-pdl", dest="pdl", action="store_false",
                        help="launch the step's kernels without programmatic dependent launch (EngineConfig.pdl)")
    parser.add_argument("--xla-rematerialization", action=argparse.BooleanOptionalAction, default=False,
                        help="compile the step with XLA's rematerialization pass (off by default: the pool puts "
                             "its memory limit out of reach and it clones GEMMs trying; "
                             "EngineConfig.xla_rematerialization)")
    parser.add_argument("--concurrent-graphs", action="store_true",
                        help="experimental, rounds differently from the default order: the step's CUDA graph "
                             "ordered by data alone (EngineConfig.concurrent_graphs)")
    parser.add_argument("--fused-rope", action="store_true",
                        help="rope and the K/V write in one kernel a layer (EngineConfig.fused_rope)")
    parser.add_argument("--fused-norm", action="store_true",
                        help="each residual add and RMSNorm in one kernel (EngineConfig.fused_norm)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="auto: keys and values in the model's dtype; fp8: float8 e4m3, a token's both on one "
                             "page (half the pages and attention's bytes; EngineConfig.kv_cache_dtype)")
    parser.add_argument("--decode-lora-tile", type=int, default=TILE, choices=(1, TILE),
                        help=f"decode rows per LoRA tile: {TILE} groups rows by adapter (default), 1 gives each row "
                             "its own (EngineConfig.decode_lora_tile)")
    parser.add_argument("--decode-lora-tiling", type=json.loads, default=None, metavar="JSON",
                        help='the tiling of the LoRA kernels that take the decode rows (and a mixed step\'s '
                             'prompt rows) over the default, e.g. \'{"k_splits": 1, "stages": 2}\' '
                             '(EngineConfig.decode_lora_tiling; benchmarks/lora_tune.py times them)')
    parser.add_argument("--steps-in-flight", type=int, default=1,
                        help="steps launched before the oldest one's tokens are read (EngineConfig.steps_in_flight): "
                             "2 gives the host two steps' time for a slow iteration (experimental: an S1 run on the "
                             "H200 did not finish with it; benchmarks/RESULTS.md, thirty-second session)")
    parser.add_argument("--compile-threads", type=int, default=0,
                        help="warm-up compiles this many step variants at once (default 0: up to 8 on a GPU, "
                             "up to 2 on the CPU; EngineConfig.compile_threads)")
    parser.add_argument("--decode-buckets", type=row_counts, default=None, metavar="N,N,...",
                        help="the row counts decode-only steps compile for (as vLLM's cudagraph_capture_sizes; "
                             "default: EngineConfig.decode_buckets)")
    parser.add_argument("--step-buckets", type=row_counts, default=None, metavar="N,N,...",
                        help=f"the row counts steps with prompt chunks compile for, multiples of {TILE} "
                             "(default: EngineConfig.step_buckets)")
    parser.add_argument("--fit-chunks-from", type=int, default=COMPUTE_BOUND_ROWS, metavar="ROWS",
                        help="from this many rows (default: where the matmuls are compute-bound), cut a step's last "
                             "prompt chunk so its rows fill a bucket instead of padding up to the next; 0: off "
                             "(EngineConfig.fit_chunks_from)")


def row_counts(text: str) -> tuple[int, ...]:
    """'16,32,64' -> (16, 32, 64)."""
    return tuple(int(n) for n in text.split(",") if n.strip())


def step_options(args) -> dict:
    """The EngineConfig fields add_step_arguments' options set."""
    return dict(fp8_gemm=args.fp8_gemm, enforce_eager=args.enforce_eager, pdl=args.pdl,
                xla_rematerialization=args.xla_rematerialization, concurrent_graphs=args.concurrent_graphs,
                fused_rope=args.fused_rope, fused_norm=args.fused_norm, kv_cache_dtype=args.kv_cache_dtype,
                compile_threads=args.compile_threads,
                decode_lora_tile=args.decode_lora_tile, decode_lora_tiling=args.decode_lora_tiling,
                steps_in_flight=args.steps_in_flight, decode_buckets=args.decode_buckets,
                step_buckets=args.step_buckets, fit_chunks_from=args.fit_chunks_from)
