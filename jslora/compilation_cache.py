"""XLA's persistent compilation cache: a server's second start loads its compiled step variants from
disk instead of compiling them again (as vLLM keeps its torch.compile artifacts under ~/.cache/vllm).

JAX also points XLA's per-fusion autotune cache into it (`<dir>/xla_gpu_per_fusion_autotune_cache_dir`,
jax_persistent_cache_enable_xla_caches): the GEMM configurations XLA measured, one small file per fusion.

On by default on the CPU only. On the H200 (jax 0.11.2, CUDA 13 plugin) warm starts are not yet
trustworthy (benchmarks/RESULTS.md): one single-threaded warm start took 91 s for 40 variants (fourth
session), but a warm startup.py process ran past its call's limit (fifth), and a bench process whose 20
S1 variants were all in the cache, compiling 8 at a time, printed nothing for 9 minutes after "compiling
its steps" (twelfth; a cold compile of the same takes ~1 min). Until that is understood, a GPU process
compiles from scratch unless a directory is named explicitly."""
from __future__ import annotations

import os

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jslora", "xla")
AUTO = "auto"


def enable(path: str | None = AUTO) -> str | None:
    """Cache compiled executables under path (created if missing); None or "" leaves caching off, "auto"
    is DEFAULT_DIR on the CPU backend and off elsewhere. Returns the directory used."""
    if not path:
        return None
    import jax

    if path == AUTO:
        if jax.default_backend() != "cpu":
            return None
        path = DEFAULT_DIR
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # every step variant, however quick to compile (the defaults skip compiles under one second)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def add_argument(parser) -> None:
    parser.add_argument("--compilation-cache-dir", default=AUTO,
                        help=f"XLA's persistent cache of compiled steps: a directory, '' for none, or 'auto' "
                             f"({DEFAULT_DIR} on the CPU, none on a GPU, where a warm cache hung the warm-up "
                             f"twice): restarts skip compiling")
