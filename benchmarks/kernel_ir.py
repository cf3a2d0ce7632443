"""The Pallas kernels as the GPU gets them, looked at from a machine without one (issues 17 and 22).

    PYTHONPATH=. python benchmarks/kernel_ir.py                      # S1's decode LoRA variants
    PYTHONPATH=. python benchmarks/kernel_ir.py --problems n5_qkv,mixed256 --variants default,one_row_dot
    PYTHONPATH=. python benchmarks/kernel_ir.py --attention "256,512,32,32" --kv-fp8 \
        --tilings '[{}, {"pack_heads": false, "num_stages": 2}]'     # decode attention, packed or not

JAX lowers a jitted function for CUDA on any machine (`.trace(...).lower(lowering_platforms=("cuda",))`):
the Pallas Triton lowering runs, and each kernel becomes a custom call that carries its grid, num_warps,
num_stages and its Triton IR. With the `triton` package installed beside (`pip install triton`; not a
dependency of the project), each kernel's IR is compiled on for sm_90a (H100 / H200) by Triton's own
passes and ptxas, and this prints what sets a latency-bound kernel's speed: programs, registers, spills,
shared memory, the CTAs an SM can hold, whether the loops were software-pipelined (async copies) and the
cross-thread reductions. These are facts about the code, not timings, and XLA's Triton (which compiles it
on the GPU) may differ a little from the pip package's; the GPU still decides (benchmarks/lora_tune.py).
Writes $OUT/kernel_ir.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile
from collections import Counter

import jax
import jax.numpy as jnp

from benchmarks.common import write_json
from pallas_kernels.attention import paged_decode_attention
from pallas_kernels.lora import lora_apply_group

# name: (rows, targets, max_rank, tokens per tile): the decode LoRA as benchmarks/lora_tune.py times it
PROBLEMS = {"s1_qkv": (240, 3, 16, 16), "s1_o": (240, 1, 16, 16), "n5_qkv": (240, 3, 16, 16),
            "mixed256": (256, 1, 64, 16), "s1_qkv_per_token": (240, 3, 16, 1)}
ENGINE_NOW = dict(k_splits=4, one_row_dot=True, stages=3, k_block=256, mask_rank=True, out_block=256, out_loop=4,
                  loads_first=True)
VARIANTS = {"default": dict(k_splits=4), "one_row_dot": dict(k_splits=4, one_row_dot=True, stages=3),
            "one_row_dot_loop8": dict(k_splits=4, one_row_dot=True, stages=3, out_block=128, out_loop=8),
            "loads_first_loop8": dict(k_splits=4, one_row_dot=True, stages=3, out_block=128, out_loop=8,
                                      loads_first=True),
            # the engine's S1 default (backend.lora_tiling at max rank 16), and with rank-8 rows masked
            "engine": dict(k_splits=4, one_row_dot=True, stages=3, out_block=256, out_loop=4, loads_first=True),
            "engine_mask_rank": dict(k_splits=4, one_row_dot=True, stages=3, out_block=256, out_loop=4,
                                     loads_first=True, mask_rank=True),
            "engine_kb256": dict(k_splits=4, one_row_dot=True, stages=3, k_block=256, out_block=256, out_loop=4,
                                 loads_first=True),
            # the engine's S1 default since 31521a0 (k_block 256, mask_rank), and its expand in fewer programs
            "engine_now": dict(ENGINE_NOW),
            "engine_now_loop8": dict(ENGINE_NOW, out_loop=8),
            "engine_now_loop16": dict(ENGINE_NOW, out_loop=16),
            "engine_now_512x4": dict(ENGINE_NOW, out_block=512),
            # page ids read before the branch on the tile's rank (one load latency less before the gathers)
            "engine_now_early": dict(ENGINE_NOW, early_pages=True),
            # ... with shorter, deeper-pipelined shrink steps (more gathers in flight per program)
            "engine_now_early_kb128_s5": dict(ENGINE_NOW, early_pages=True, k_block=128, stages=5),
            # one-row tiles multiplied elementwise into a [16, k block] accumulator, the walk unrolled
            "engine_now_fma": dict(ENGINE_NOW, early_pages=True, one_row_fma=True),
            "engine_now_fma_kb512": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, k_block=512),
            "engine_now_fma_split": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, split_rows=True),
            # an expand program's 1024 columns as one block: [16, 1024] tiles whose warps lie along the columns
            "engine_now_fma_1024x1": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, out_block=1024, out_loop=1),
            "engine_now_fma_512x2": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, out_block=512, out_loop=2),
            # the expand's one-row products with v read in B's layout (no conversion of B through shared memory)
            "engine_fma_both": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, expand_one_row_fma=True),
            "engine_fma_both_1024x1": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, expand_one_row_fma=True,
                                           out_block=1024, out_loop=1),
            # one-row tiles walked in [8, 1024] steps (warps along the columns: x's row needs no conversion)
            "engine_fma_wide": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, one_row_k_block=1024),
            "engine_fma_wide512": dict(ENGINE_NOW, early_pages=True, one_row_fma=True, one_row_k_block=512),
            # the engine's since the nineteenth session, and with one-row tiles in launches of their own (the
            # other tiles' launch is the engine's kernel without the one-row code)
            "engine_early": dict(ENGINE_NOW, early_pages=True),
            # the engine's since the twenty-ninth session (the shrink in 2 warps), and what might let more of its
            # programs share an SM: a shallower pipeline, wider steps, the expand's fewer blocks a program
            "engine_w2": dict(ENGINE_NOW, early_pages=True, shrink_warps=2),
            "engine_w2_s2": dict(ENGINE_NOW, early_pages=True, shrink_warps=2, stages=2),
            "engine_w2_kb512_s2": dict(ENGINE_NOW, early_pages=True, shrink_warps=2, stages=2, k_block=512),
            "engine_w2_loop2": dict(ENGINE_NOW, early_pages=True, shrink_warps=2, out_loop=2),
            "engine_w2_loop2_ew2": dict(ENGINE_NOW, early_pages=True, shrink_warps=2, out_loop=2, expand_warps=2),
            "engine_kinds": dict(ENGINE_NOW, early_pages=True, kind_launches=True),
            "engine_kinds_fma": dict(ENGINE_NOW, early_pages=True, kind_launches=True, one_row_fma=True,
                                     expand_one_row_fma=True),
            "engine_kinds_fma_split": dict(ENGINE_NOW, early_pages=True, kind_launches=True, one_row_fma=True,
                                           expand_one_row_fma=True, split_rows=True),
            # ... the one-row shrink walking 8 rows (rank 8) at a time in [8, 256] / [8, 512] steps
            "engine_kinds_fma_w256": dict(ENGINE_NOW, early_pages=True, kind_launches=True, one_row_fma=True,
                                          expand_one_row_fma=True, one_row_k_block=256),
            "engine_kinds_fma_w512": dict(ENGINE_NOW, early_pages=True, kind_launches=True, one_row_fma=True,
                                          expand_one_row_fma=True, one_row_k_block=512),
            # one-row tiles' shrink and expand in one program (pallas_kernels.lora_fused), reads 4 / 8 steps ahead
            "engine_fused": dict(ENGINE_NOW, early_pages=True, fused_one_row=True),
            "engine_fused_d8": dict(ENGINE_NOW, early_pages=True, fused_one_row=True, fused_depth=8),
            "engine_fused_w8": dict(ENGINE_NOW, early_pages=True, fused_one_row=True, fused_warps=8, fused_depth=8),
            "engine_fused_b256": dict(ENGINE_NOW, early_pages=True, fused_one_row=True, fused_block=256, fused_depth=8),
            "engine_fused_b256d4": dict(ENGINE_NOW, early_pages=True, fused_one_row=True, fused_block=256),
            "engine_fused_d2": dict(ENGINE_NOW, early_pages=True, fused_one_row=True, fused_depth=2),
            # the engine's now (backend.lora_tiling: S1's at max rank 16, LORA_TILING above one rank block)
            "engine_s1": dict(ENGINE_NOW, early_pages=True, shrink_warps=2),
            "engine_mixed": dict(k_splits=4, one_row_dot=True, stages=3, k_block=256, mask_rank=True, shrink_warps=2)}
H = 4096
SM90 = dict(registers=65536, shared=233472, blocks=32, warps=64)  # per SM; 1 KB of shared per CTA is reserved


def gpu_lowering(fn, *args) -> str:
    """fn(*args) lowered for CUDA (args may be jax.ShapeDtypeStruct: nothing is allocated) as StableHLO text."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(hlo: str) -> list[dict]:
    """The Pallas Triton kernels in lowered StableHLO text, in order: name, grid, num_warps, num_stages."""
    # the backend config's fields print in alphabetical order; the IR string between them escapes quotes
    pattern = (r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32, ir = "[^"]*", '
               r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')
    return [{"name": name, "grid": (int(x), int(y), int(z)), "num_warps": int(warps), "num_stages": int(stages)}
            for x, y, z, name, stages, warps in re.findall(pattern, hlo)]


def lower_kernels(fn, *args) -> tuple[list[dict], list[str]]:
    """fn's Pallas kernels lowered for CUDA: triton_calls, and each one's Triton IR (text) in the same
    order, caught from jax's private lowering hook (JAX caches lowerings, so both come from one pass)."""
    from jax._src.pallas.triton import lowering

    modules, lower = [], lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        result = lower(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = keep
    try:
        calls = triton_calls(gpu_lowering(fn, *args))
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    return calls, modules


def compile_sm90(ttir: str, num_warps: int, num_stages: int) -> dict:
    """Triton IR -> sm_90a with the triton package and its ptxas: what the hardware will hold."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ttir")
        with open(source, "w") as f:
            f.write(ttir)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        for name in ("ptxas", "ptxas-blackwell"):  # Triton 3.9's PTX needs the second (the first is older)
            done = subprocess.run([os.path.join(tools, name), "-v", "--gpu-name=sm_90a", ptx, "-o",
                                   os.path.join(folder, "k.cubin")], capture_output=True, text=True)
            if done.returncode == 0:
                break
        done.check_returncode()
        report = done.stderr
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", os.path.join(folder, "k.cubin")],
                              capture_output=True, text=True).stdout
    ttgir = kernel.asm["ttgir"]
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    shared = int(kernel.metadata.shared)
    per_cta = {"registers": -(-registers // 8) * 8 * 32 * num_warps, "shared": shared + 1024}
    ctas = min(SM90["blocks"], SM90["warps"] // num_warps, SM90["registers"] // per_cta["registers"],
               SM90["shared"] // per_cta["shared"])
    return {"registers": registers, "spills": spills, "shared": shared, "ctas_per_sm": ctas,
            "async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "reductions": ttgir.count('"tt.reduce"'), "dots": ttgir.count("tt.dot ") + ttgir.count("warp_group_dot"),
            "loop_sass": loop_sass(sass),
            "global_loads": dict(Counter(re.findall(r"ld\.global[.\w]*", kernel.asm["ptx"])).most_common(4))}


def loop_sass(sass: str) -> int:
    """Machine instructions (SASS) a thread issues per pass of the kernel's main loop: the backward branch's
    body holding the most tensor-core instructions (HMMA); 0 where there is none. What ptxas left, not the
    PTX, whose counts include moves and shuffles that ptxas folds away."""
    code = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    where = {address: i for i, (address, _) in enumerate(code)}
    best = (0, 0)
    for i, (address, text) in enumerate(code):
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in where:
            body = code[where[int(target.group(1), 16)]: i + 1]
            best = max(best, (sum("HMMA" in t for _, t in body), len(body)))
    return best[1]


def decode_attention(batch: int, context: int, heads: int, kv_heads: int, kv_fp8: bool, **tiling):
    """One layer's decode attention at head dim 128 over a 2,048-wide table, as (fn, abstract args)."""
    s, pages = jax.ShapeDtypeStruct, 100_000
    table = s((batch, max(context, 2048)), jnp.int32)
    args = (s((batch, heads, 128), jnp.bfloat16), s((pages, kv_heads * 128), jnp.bfloat16), s((), jnp.int32),
            s((batch,), jnp.int32), table, table)
    return functools.partial(paged_decode_attention, num_pages=pages, kv_fp8=kv_fp8, interpret=False, **tiling), args


def decode_lora(rows: int, targets: int, max_rank: int, tokens_per_tile: int, **tiling):
    """The engine's decode LoRA at Llama-7B's width, as (fn, abstract args)."""
    s = jax.ShapeDtypeStruct  # as many tiles as rows: the engine's worst case, every row its own adapter
    pages = tuple(s((rows, 1, max_rank), jnp.int32) for _ in range(targets))
    args = (s((rows, H), jnp.bfloat16), tuple(s((rows, H), jnp.bfloat16) for _ in range(targets)),
            s((2 * 4000, H), jnp.bfloat16), s((), jnp.int32), s((rows, targets), jnp.int32), pages, pages,
            s((rows, tokens_per_tile), jnp.int32) if tokens_per_tile > 1 else None)
    fn = functools.partial(lora_apply_group, num_pages=4000, tokens_per_tile=tokens_per_tile, interpret=False,
                           **tiling)
    return fn, args


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="s1_qkv,s1_o,s1_qkv_per_token")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--attention", default=None, metavar="B,C,HQ,HKV;...",
                    help="decode attention at these (batch, context, query heads, KV heads) instead of the LoRA")
    ap.add_argument("--tilings", type=json.loads, default=[{}], metavar="JSON",
                    help='--attention: tilings over decode_launch_params\', e.g. \'[{}, {"pack_heads": false}]\'')
    ap.add_argument("--kv-fp8", action="store_true", help="--attention: over an FP8 cache")
    args = ap.parse_args()
    try:
        import triton  # noqa: F401
        compiled = True
    except ImportError:
        compiled = False
        print("no triton package: grids only (pip install triton for registers, shared memory, pipelining)")
    results = []
    if args.attention:
        cases = [(shape, json.dumps(tiling), functools.partial(decode_attention, *map(int, shape.split(",")),
                                                               args.kv_fp8, **tiling))
                 for shape in args.attention.split(";") for tiling in args.tilings]
    else:
        cases = [(problem, variant, functools.partial(decode_lora, *PROBLEMS[problem], **VARIANTS[variant]))
                 for problem in args.problems.split(",") for variant in args.variants.split(",")]
    for problem, variant, build in cases:
        fn, fn_args = build()
        calls, modules = lower_kernels(fn, *fn_args)
        assert len(calls) == len(modules), "a kernel's lowering came from JAX's cache"
        for call, ttir in zip(calls, modules):
            row = {"problem": problem, "variant": variant, **call, "programs": call["grid"][0] * call["grid"][1]
                   * call["grid"][2]}
            if compiled:
                row.update(compile_sm90(ttir, call["num_warps"], call["num_stages"]))
            results.append(row)
            print(row, flush=True)
    print(f"wrote {write_json('kernel_ir.json', {'jax': jax.__version__, 'results': results})}")
    columns = ["programs", "num_stages"] + (["registers", "spills", "shared", "ctas_per_sm", "async_copies",
                                              "reductions", "dots", "loop_sass"] if compiled else [])
    print(f"\n{'problem':>16} {'variant':>18} {'kernel':>12} " + " ".join(f"{c:>12}" for c in columns))
    for r in results:
        print(f"{r['problem']:>16} {r['variant'][:18]:>18} {r['name'][:12]:>12} "
              + " ".join(f"{r[c]:>12}" for c in columns))


if __name__ == "__main__":
    main()
