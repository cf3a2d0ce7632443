"""Every kernel, and the engine's whole step, lowers for the GPU (CUDA, Pallas' Triton backend) on this CPU.

Interpret mode checks what the kernels compute, not whether Triton accepts them: an op the Triton
lowering rejects, or a static shape it cannot tile, would pass every other test and fail only on a GPU.
JAX lowers for CUDA on any machine (`lowering_platforms`), running the same Pallas-to-Triton lowering
the GPU build runs (jaxlib 0.10; from 0.11 the lowering also compiles, which needs the GPU).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks.kernel_ir import decode_lora, gpu_lowering, lower_kernels, triton_calls
from jslora import LLM
from pallas_kernels.attention import paged_decode_attention
from pallas_kernels.attention_prefill import paged_prefill_attention
from pallas_kernels.kv_write import write_kv
from pallas_kernels.rms_norm import add_rms_norm
from pallas_kernels.rope_kv import rope_write_kv
from pallas_kernels.skinny_gemm import skinny_gemm

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def kernels(fn, *args) -> list[dict]:
    return triton_calls(gpu_lowering(fn, *args))


@pytest.mark.parametrize("tiling", [
    dict(k_splits=4),                                             # the engine's decode tiling
    dict(k_splits=4, one_row_dot=True, stages=3),
    dict(k_splits=4, split_rows=True, one_row_dot=True, out_block=128, out_loop=8),
    dict(k_splits=1, k_block=1024, out_block=256),
    dict(k_splits=4, one_row_dot=True, stages=3, out_block=256, out_loop=4, loads_first=True),
    dict(k_splits=4, one_row_dot=True, stages=3, out_block=256, out_loop=4, loads_first=True, mask_rank=True),
    dict(k_splits=4, one_row_dot=True, stages=3, out_block=256, out_loop=4, loads_first=True, mask_rank=True,
         early_pages=True),
    dict(k_splits=4, one_row_dot=True, stages=3, shrink_warps=2, expand_warps=8),
])
@pytest.mark.parametrize("tokens_per_tile", [1, 16])
def test_lora_kernels_lower_for_the_gpu_at_s1_shapes(tiling, tokens_per_tile):
    """Llama-7B's q, k, v group at 240 decode rows: one shrink and one expand, on the grids the tiling
    asks for (tiles x rank blocks x splits; tiles x column blocks / out_loop)."""
    fn, args = decode_lora(240, 3, 16, tokens_per_tile, **tiling)
    calls = kernels(fn, *args)
    assert [c["name"] for c in calls] == ["lora_shrink", "lora_expand"]
    shrink, expand = calls
    assert shrink["grid"] == (240, 3, tiling["k_splits"])
    assert shrink["num_stages"] == tiling.get("stages", 2)
    assert (shrink["num_warps"], expand["num_warps"]) == (tiling.get("shrink_warps", 4), tiling.get("expand_warps", 4))
    out_block = tiling.get("out_block") or (256 if tokens_per_tile == 1 else 128)
    assert expand["grid"] == (240, 3 * 4096 // out_block // tiling.get("out_loop", 1), 1)


@pytest.mark.parametrize("batch, context, heads, kv_heads, combine", [
    (256, 160, 32, 32, "xla"),    # MHA, one pass
    (1, 4096, 32, 8, "xla"),      # GQA, the context split over programs (flash-decoding) and combined after
    (1, 4096, 32, 8, "kernel"),   # ... combined in the same launch: no reductions left to XLA
])
def test_attention_kernels_lower_for_the_gpu(batch, context, heads, kv_heads, combine):
    pool = S((2 * 8192, kv_heads * 128), BF16)
    q = S((batch, heads, 128), BF16)
    pages = S((batch, context), jnp.int32)
    hlo = gpu_lowering(lambda q, pool, lens, kp, vp: paged_decode_attention(q, pool, 1, lens, kp, vp, num_pages=8192,
                                                                            combine=combine, interpret=False),
                       q, pool, S((batch,), jnp.int32), pages, pages)
    assert [c["name"] for c in triton_calls(hlo)] == ["paged_decode_attention"]
    assert ("stablehlo.reduce" in hlo) == (combine == "xla" and batch == 1)
    tiles = 8
    rows = S((tiles * 16, heads, 128), BF16)
    calls = kernels(lambda q, pool, seq, pos, lens, kp, vp: paged_prefill_attention(
        q, pool, 1, seq, pos, lens, kp, vp, num_pages=8192, tile=16, interpret=False),
        rows, pool, S((tiles,), jnp.int32), S((tiles,), jnp.int32), S((4,), jnp.int32), S((4, 256), jnp.int32),
        S((4, 256), jnp.int32))
    assert [c["name"] for c in calls] == ["paged_prefill_attention"]
    kv = S((batch, kv_heads * 128), BF16)
    calls = kernels(lambda pool, kp, vp, k, v: write_kv(pool, 1, kp, vp, k, v, num_pages=8192, interpret=False),
                    pool, S((batch,), jnp.int32), S((batch,), jnp.int32), kv, kv)
    assert len(calls) == 1


@pytest.mark.parametrize("batch, context, heads, kv_heads, combine", [
    (256, 160, 32, 32, "xla"),    # Llama-7B at batch 256
    (1, 4096, 32, 8, "kernel"),   # Llama-3-8B at batch 1, splits merged in the kernel
    (8, 1024, 40, 40, "xla"),     # Llama-13B: 40 heads
])
def test_fp8_kv_kernels_lower_for_the_gpu(batch, context, heads, kv_heads, combine):
    """Decode and prefill attention over FP8 pages, and the FP8 K/V write, in a bf16 pool (two FP8 values a
    word: shifts, masks and bitcasts that the Triton lowering must take)."""
    pool = S((2 * 8192, kv_heads * 128), BF16)
    pages = S((batch, context), jnp.int32)
    calls = kernels(lambda q, pool, lens, kp, vp: paged_decode_attention(q, pool, 1, lens, kp, vp, num_pages=8192,
                                                                         combine=combine, kv_fp8=True, interpret=False),
                    S((batch, heads, 128), BF16), pool, S((batch,), jnp.int32), pages, pages)
    assert [c["name"] for c in calls] == ["paged_decode_attention"]
    calls = kernels(lambda q, pool, seq, pos, lens, kp, vp: paged_prefill_attention(
        q, pool, 1, seq, pos, lens, kp, vp, num_pages=8192, tile=16, kv_fp8=True, interpret=False),
        S((64, heads, 128), BF16), pool, S((4,), jnp.int32), S((4,), jnp.int32), S((batch,), jnp.int32), pages, pages)
    assert [c["name"] for c in calls] == ["paged_prefill_attention"]
    kv = S((batch, kv_heads * 128), BF16)
    calls = kernels(lambda pool, kp, vp, k, v: write_kv(pool, 1, kp, vp, k, v, num_pages=8192, kv_fp8=True,
                                                        interpret=False),
                    pool, S((batch,), jnp.int32), S((batch,), jnp.int32), kv, kv)
    assert [c["name"] for c in calls] == ["write_kv"]


@pytest.mark.parametrize("kv_fp8, tiling", [(False, {}), (True, {}), (False, dict(pack_heads=False)),
                                           (True, dict(pack_heads=False)),
                                           (False, dict(pack_heads=False, prefetch_pages=True, num_stages=3))])
def test_decode_key_and_value_gathers_are_masked(kv_fp8, tiling):
    """With mask_padding, every K/V gather of the decode kernel carries the length mask, so keys past a
    sequence's length touch no memory (without it they read the null page's row). Llama-7B's two heads a
    program: packed into one query tile (the default), a key and a value gather a step, both heads wide;
    apart, one of each a head."""
    pool, pages = S((2 * 8192, 32 * 128), BF16), S((256, 2048), jnp.int32)
    _, [ir] = lower_kernels(lambda q, pool, lens, kp, vp: paged_decode_attention(
        q, pool, 1, lens, kp, vp, num_pages=8192, kv_fp8=kv_fp8, mask_padding=True, interpret=False, **tiling),
        S((256, 32, 128), BF16), pool, S((256,), jnp.int32), pages, pages)
    packed = tiling.get("pack_heads", True)
    width = (64 if kv_fp8 else 128) * (2 if packed else 1)  # pool words a key, of one head or both
    gathers = re.findall(rf"tt\.load ([^:]*): tensor<32x{width}x!tt\.ptr<bf16>>", ir)
    assert len(gathers) == (2 if packed else 4)
    assert all(len(operands.split(",")) == 3 for operands in gathers)  # pointer, mask, other


@pytest.mark.parametrize("fp8_unpack", ["hardware", "bits"])
def test_fp8_kv_words_convert_in_one_instruction_and_the_dots_run_in_float16(fp8_unpack):
    """On the GPU a word's two FP8 values become two float16 by one PTX conversion (kv_fp8.unpack), which
    interpret mode cannot run: the Triton IR must carry it (and the bit path must not), and the scores' and
    weighted sum's dots must take float16 operands, in decode (MHA at batch 256) and prefill attention."""
    pool, pages = S((2 * 8192, 32 * 128), BF16), S((256, 160), jnp.int32)
    _, [decode] = lower_kernels(lambda q, pool, lens, kp, vp: paged_decode_attention(
        q, pool, 1, lens, kp, vp, num_pages=8192, kv_fp8=True, fp8_unpack=fp8_unpack, interpret=False),
        S((256, 32, 128), BF16), pool, S((256,), jnp.int32), pages, pages)
    assert ("cvt.rn.f16x2.e4m3x2" in decode) == (fp8_unpack == "hardware")
    dots = re.findall(r"tt\.dot [^\n]*: (tensor<[^>]*>) \* (tensor<[^>]*>)", decode)
    # 2 phases x (scores, weighted sum), over both heads of the program at once: the query tile is packed
    # [16, 2 heads x 64 words] and each value phase 2 x 64 wide (pallas_kernels.decode_tiling.PACK_HEADS)
    scores, weighted_sum = ("tensor<16x128xf16>", "tensor<128x32xf16>"), ("tensor<16x32xf16>", "tensor<32x128xf16>")
    assert dots == [scores, scores, weighted_sum, weighted_sum]
    if fp8_unpack == "hardware":
        _, [prefill] = lower_kernels(lambda q, pool, seq, pos, lens, kp, vp: paged_prefill_attention(
            q, pool, 1, seq, pos, lens, kp, vp, num_pages=8192, tile=16, kv_fp8=True, interpret=False),
            S((64, 32, 128), BF16), pool, S((4,), jnp.int32), S((4,), jnp.int32), S((4,), jnp.int32),
            S((4, 256), jnp.int32), S((4, 256), jnp.int32))
        assert "cvt.rn.f16x2.e4m3x2" in prefill


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv", "fp8-kv"])
@pytest.mark.parametrize("tokens, heads, kv_heads, head_blocks", [(1, 32, 32, 1), (256, 32, 8, 4), (16, 40, 40, 5)])
def test_rope_write_kv_lowers_for_the_gpu(tokens, heads, kv_heads, head_blocks, kv_fp8):
    """Rope and the K/V write in one kernel at Llama-7B's, Llama-3-8B's and Llama-13B's heads, keys and values
    in the model's dtype or FP8."""
    pool = S((2 * 8192, kv_heads * 128), BF16)
    calls = kernels(lambda q, k, v, cos, sin, pool, kp, vp: rope_write_kv(q, k, v, cos, sin, pool, 1, kp, vp,
                                                                          num_pages=8192, kv_fp8=kv_fp8,
                                                                          interpret=False),
                    S((tokens, heads, 128), BF16), S((tokens, kv_heads, 128), BF16), S((tokens, kv_heads, 128), BF16),
                    S((tokens, 128), jnp.float32), S((tokens, 128), jnp.float32), pool,
                    S((tokens,), jnp.int32), S((tokens,), jnp.int32))
    assert [c["name"] for c in calls] == ["rope_write_kv"]
    assert calls[0]["grid"][:2] == (tokens, head_blocks)  # blocks of a power of two heads dividing both counts


@pytest.mark.parametrize("rows, width, with_delta", [(1, 4096, True), (256, 4096, True), (256, 5120, False),
                                               (3, 8192, True)])
def test_add_rms_norm_lowers_for_the_gpu(rows, width, with_delta):
    """The residual add and RMSNorm at Llama-7B's, Llama-13B's (not a power of two) and Llama-70B's widths."""
    x = S((rows, width), BF16)
    calls = kernels(lambda x, d, w: add_rms_norm(x, d if with_delta else None, w, eps=1e-5, interpret=False),
                    x, x, S((width,), BF16))
    assert [c["name"] for c in calls] == ["add_rms_norm" if with_delta else "rms_norm"]
    assert calls[0]["grid"][0] == rows  # a program a row


@pytest.mark.parametrize("rows, form, dot_dtype", [(1, "fma", None), (32, "xw", None), (32, "wx", None),
                                                   (32, "wx", "float8_e4m3fn")])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_skinny_gemm_lowers_for_the_gpu(rows, form, dot_dtype, layout):
    """The decode GEMM on FP8 weights (Llama-7B's fused q, k, v) in each form and layout, weight-only and
    FP8 x FP8."""
    weight = S((3 * 4096, 4096) if layout == "nk" else (4096, 3 * 4096), jnp.float8_e4m3fn)
    calls = kernels(lambda x, w, s: skinny_gemm(x, w, s, layout=layout, form=form, dot_dtype=dot_dtype,
                                                interpret=False),
                    S((rows, 4096), BF16), weight, S((3 * 4096,), jnp.float32))
    assert len(calls) == 1 and calls[0]["name"].startswith("skinny_gemm"), calls


def engine_step_kernels(checkpoints, **engine) -> list[dict]:
    """The Pallas kernels of the tiny GQA model's engine step (prompt chunks and decode rows, every LoRA
    target), lowered for CUDA."""
    from jslora.config import LORA_TARGETS
    from jslora.engine.batch import step_batch
    from jslora.model.packing import pack_batch
    from jslora.model.paged import jitted_step

    adapters = {n: str(p) for n, p in checkpoints["gqa"]["adapters"].items()}
    llm = LLM(str(checkpoints["gqa"]["dir"]), adapters, dtype="bfloat16", max_lora_rank=16, max_model_len=128,
              engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=64, lora_targets=LORA_TARGETS,
                          kernels="pallas", **engine), warmup=False)
    runner, residency = llm.engine.runner, llm.engine.residency
    meta = step_batch([], [], runner.step_buckets[0], runner.shapes(), residency, with_prefill=True)
    spec = dataclasses.replace(runner.spec, interpret=False)
    params, pool, slot_state = jax.tree.map(lambda x: S(x.shape, x.dtype), (runner.params, runner.pool,
                                                                           runner.slot_state))
    hlo = jitted_step(meta.num_rows).trace(params, spec, pool, slot_state, *pack_batch(meta),
                                           filtered=False).lower(lowering_platforms=("cuda",)).as_text()
    return triton_calls(hlo)


def test_the_engine_step_lowers_for_the_gpu_with_every_kernel(checkpoints):
    """The tiny GQA model's engine step with prompt chunks and decode rows, adapters on: the step the GPU
    compiles, every Pallas kernel in it (decode and prefill attention, the KV write, LoRA's shrink and
    expand for decode and prefill rows, for attention's and the MLP's targets) lowered for CUDA."""
    calls = engine_step_kernels(checkpoints)
    names = {c["name"] for c in calls}
    assert {"paged_decode_attention", "paged_prefill_attention", "write_kv", "lora_shrink", "lora_expand"} <= names
    # LoRA per layer (the layers' equal launches lower to one shared function): q,k,v; o; gate,up; down,
    # each one shrink for the decode rows and the prompt chunks together (paged._one_lora_launch)
    assert sum(c["name"] == "lora_shrink" for c in calls) == 4, calls
    # with fused_rope the K/V write is rope_write_kv's; with fused_norm the norms are ours: the first layer's
    # first one on the embeddings alone, every later one with the residual add before it; and all of it over
    # an FP8 KV cache
    fused = {c["name"] for c in engine_step_kernels(checkpoints, fused_rope=True, fused_norm=True,
                                                    kv_cache_dtype="fp8")}
    assert {"rope_write_kv", "rms_norm", "add_rms_norm"} <= fused and "write_kv" not in fused


def test_the_engine_takes_the_decode_lora_tiling_it_is_given(checkpoints):
    """The LoRA kernels run backend.lora_tiling (shrinks pipelined 3 deep); EngineConfig.decode_lora_tiling
    reaches the call that holds the decode rows (a mixed step's prompt rows with them); with one-row
    decode tiles (decode_lora_tile = 1) the prompt rows get their own call, at the default tiling."""
    def shrink_stages(calls):
        return [c["num_stages"] for c in calls if c["name"] == "lora_shrink"]

    assert shrink_stages(engine_step_kernels(checkpoints)) == [3] * 4  # q,k,v; o; gate,up; down
    assert shrink_stages(engine_step_kernels(checkpoints, decode_lora_tiling={"stages": 2})) == [2] * 4
    apart = engine_step_kernels(checkpoints, decode_lora_tiling={"stages": 2}, decode_lora_tile=1)
    assert sorted(shrink_stages(apart)) == [2] * 4 + [3] * 4


def test_the_expand_issues_reads_first_only_where_max_rank_is_one_block():
    """backend.lora_tiling: adapters padded to one rank block (16) get the expand that covers 4 column
    blocks and issues their reads first; larger max ranks (a walk over rank blocks) keep one block a
    program; an engine's decode_lora_tiling overrides either."""
    from jslora.model.backend import LORA_TILING, lora_tiling

    assert lora_tiling(16) == LORA_TILING | dict(out_block=256, out_loop=4, loads_first=True, early_pages=True)
    assert lora_tiling(64) == LORA_TILING and "loads_first" not in lora_tiling(32)
    assert lora_tiling(16, (("out_loop", 1), ("k_splits", 1)))["out_loop"] == 1
    assert lora_tiling(64, (("k_splits", 1),))["k_splits"] == 1


def test_pdl_probe_kernel_lowers_with_its_wait():
    """benchmarks/pdl_probe.py's kernel lowers for the GPU, the wait in its IR only when asked."""
    from benchmarks.pdl_probe import add_one

    for wait in (False, True):
        calls, [module] = lower_kernels(lambda x, wait=wait: add_one(x, wait), S((64, 128), jnp.float32))
        assert [c["name"] for c in calls] == ["add_one_waits" if wait else "add_one"]
        assert ("griddepcontrol.wait" in module) == wait
