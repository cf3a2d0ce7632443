"""How a step computes attention and LoRA, chosen once per engine (EngineConfig.kernels names it).

- "pallas": the Pallas kernels for both (production).
- "reference": plain jnp gathers for both: the oracle the kernels are tested against.

The baselines `jslora bench` compares against (S-LoRA's "bmm" LoRA, the no-LoRA-communication cost
study) are Backends too, defined in jslora.bench.baselines and handed to the Engine, out of this path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jslora.parallel.tensor_parallel import TP_AXIS
from pallas_kernels.attention import paged_attention_reference, paged_decode_attention_counted
from pallas_kernels.attention_prefill import paged_prefill_attention
from pallas_kernels.lora import lora_apply_group, lora_apply_group_reference
from pallas_kernels.pool import TILE

# the LoRA kernels' tiling (pallas_kernels.lora.lora_apply_group's keywords), decode and prompt rows alike,
# chosen on the H200 by benchmarks/lora_tune.py (RESULTS.md, tenth session): the shrink's input features
# over 4 programs, a one-row tile's shrink on tensor-core dots three stages deep (a pipelined walk); steps
# of 256 input features, and a rank block's rows past the adapter's rank masked off rather than read from
# the null page (thirteenth session: the shrink 28.1 -> 22.4 us at S1's q,k,v with 226 rank-8 adapters,
# 13.2 -> 10.9 and 25.8 -> 21.9 us at 64 and 256 adapters of ranks 8-64); the shrink in 2 warps a program (a
# one-row tile's 16 x 16 dot fills two warps' mma tiles, at 4 it repeats over a second pair; twenty-ninth
# session: the shrink 10-18% faster on all five problems, e.g. S1's q,k,v 21.8 -> 18.7 us, 256 adapters 22.0 -> 19.7)
LORA_TILING = dict(k_splits=4, one_row_dot=True, stages=3, k_block=256, mask_rank=True, shrink_warps=2)
# where the adapters' max rank is one rank block (S1's rank 8 in blocks of 16): an expand program covers 4
# blocks of 256 columns and issues all their reads before any product (2x faster there; where it must walk
# rank blocks, out_loop 4 measured slower); both kernels read their page ids before branching on the
# tile's rank (sixteenth session: S1's q, k, v 66.2 -> 60.5 us, n = 5's 33.7 -> 31.8; o unchanged). A
# one-row tile's shrink stays on the pipelined dots: one_row_fma, faster with the adapter rows in L2, is
# slower read from HBM and inside a step (nineteenth session: the q, k, v shrink 24.4 -> 29.0 us a layer
# at batch 256 with 256 adapters)
ONE_RANK_BLOCK = dict(out_block=256, out_loop=4, loads_first=True, early_pages=True)


def lora_tiling(max_rank: int, overrides=()) -> dict:
    """The tiling the engine runs a group's LoRA with, for adapters padded to max_rank."""
    return LORA_TILING | (ONE_RANK_BLOCK if max_rank <= TILE else {}) | dict(overrides)


# what EngineConfig.decode_lora_tiling may set over the decode tiling
DECODE_LORA_OPTIONS = ("k_splits", "split_rows", "k_block", "one_row_dot", "one_row_fma", "one_row_k_block",
                       "stages", "out_block", "out_loop", "loads_first", "expand_one_row_dot",
                       "expand_one_row_fma", "mask_rank", "early_pages", "kind_launches", "one_row_out_loop",
                       "fused_one_row", "fused_block", "fused_depth", "fused_warps", "shrink_warps", "expand_warps")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    pallas_attention: bool
    pallas_lora: bool

    @property
    def finish_q_before_kv_write(self) -> bool:
        # plain-XLA LoRA: q is finished before the in-place KV write, lest its LoRA rows be read from the
        # pool after it and XLA copy the whole pool first (the bmm prefill once asked for 53 GB); the
        # Pallas kernels make q with k and v
        return not self.pallas_lora

    def prefill_attention(self, q, pool, layer, positions, tile_seq, tile_pos, seq_lens, k_pages, v_pages, *,
                          tile: int, num_pages: int, interpret, kv_fp8: bool = False):
        """Prompt chunks' rows [N] in tiles of `tile` rows of one sequence (jslora.engine.batch.PrefillTiles).
        kv_fp8: the pages hold FP8 keys and values (pallas_kernels.kv_fp8)."""
        if self.pallas_attention:
            return paged_prefill_attention(q, pool, layer, tile_seq, tile_pos, seq_lens, k_pages, v_pages,
                                           num_pages=num_pages, tile=tile, kv_fp8=kv_fp8, interpret=interpret)
        return paged_attention_reference(q, pool, layer, positions, jnp.repeat(tile_seq, tile), k_pages, v_pages,
                                         num_pages=num_pages, kv_fp8=kv_fp8)

    def decode_attention(self, q, pool, layer, lens, k_pages, v_pages, *, num_pages: int, interpret,
                         kv_fp8: bool = False, counters=None):
        """One query row per sequence [R], keys 0 .. lens - 1 (lens 0: an idle row). -> (out, counters): the
        kernel's merge counters, zeroed, for the next call (pallas_kernels.attention.paged_decode_attention_counted;
        None where nothing counts)."""
        if self.pallas_attention:
            return paged_decode_attention_counted(q, pool, layer, lens, k_pages, v_pages, counters,
                                                  num_pages=num_pages, kv_fp8=kv_fp8, interpret=interpret)
        return paged_attention_reference(q, pool, layer, jnp.maximum(lens - 1, 0), jnp.arange(q.shape[0]), k_pages,
                                         v_pages, num_pages=num_pages, kv_fp8=kv_fp8), counters

    def lora_group(self, x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows, *, tokens_per_tile: int,
                   decode: bool, num_pages: int, interpret, decode_tiling: tuple = ()):
        """y_t + x A_t B_t for a group of targets sharing x (see pallas_kernels.lora.lora_apply_group);
        tiled by lora_tiling, decode rows with decode_tiling's (option, value) pairs over it."""
        args = (x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows)
        if self.pallas_lora:
            max_rank = b_pages[0].shape[-1]  # [tiles, chunks, max_rank]
            return lora_apply_group(*args, tokens_per_tile=tokens_per_tile, num_pages=num_pages, interpret=interpret,
                                    **lora_tiling(max_rank, decode_tiling if decode else ()))
        return lora_apply_group_reference(*args, tokens_per_tile=tokens_per_tile, num_pages=num_pages,
                                          interpret=interpret)

    def gather_rank_slices(self, v, tp: int):
        """Column-parallel LoRA: join the tp devices' [rows, targets, rank/tp] shrink outputs (S-LoRA's
        one all-gather per layer and group; jslora.parallel.lora_partition)."""
        return jax.lax.all_gather(v, TP_AXIS, axis=2, tiled=True)


BACKENDS = {"pallas": Backend("pallas", True, True), "reference": Backend("reference", False, False)}
