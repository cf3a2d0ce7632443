"""XLA's persistent compilation cache: a server's second start loads its compiled step variants from
disk instead of compiling them again (as vLLM keeps its torch.compile artifacts under ~/.cache/vllm).

JAX also points XLA's per-fusion autotune cache into it (`<dir>/xla_gpu_per_fusion_autotune_cache_dir`,
jax_persistent_cache_enable_xla_caches): the GEMM configurations XLA measured, one small file per fusion.
A process that finds them skips that autotuning and picks the same kernels, so step times repeat across
processes; benchmarks carry that folder from one GPU machine to the next (README.md, Benchmarks)."""
from __future__ import annotations

import os

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jslora", "xla")


def enable(path: str | None = DEFAULT_DIR) -> str | None:
    """Cache compiled executables under path (created if missing); None or "" leaves caching off.
    Returns the directory used."""
    if not path:
        return None
    import jax

    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # every step variant, however quick to compile (the defaults skip compiles under one second)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def add_argument(parser) -> None:
    parser.add_argument("--compilation-cache-dir", default=DEFAULT_DIR,
                        help="XLA's persistent cache of compiled steps ('' to turn it off): restarts skip compiling")
