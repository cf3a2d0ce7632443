"""Host-side step batches: frozen pytree dataclasses of numpy arrays, padded to the step's bucket, for
jslora.model.paged's jitted steps (their fields are the steps' only inputs besides params and pool).

Padding rows point at the null block/page and at batch slot `max_batch` (out of range: their tokens
are dropped), so they read zeros and write nothing.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jslora.memory import AdapterResidency
from jslora.memory.adapter_residency import BASE_SLOT
from jslora.model.paged import PREFILL_TILE
from jslora.request import Request
from pallas_kernels.lora import tiles_by_adapter
from pallas_kernels.pool import TILE, round_up


def _pytree(cls):
    """A frozen dataclass whose fields are all pytree children (arrays, or pytrees of arrays)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                            meta_fields=[])


@_pytree
class SamplingBatch:
    """Per row: temperature, top_p (float32), top_k, seed and the row's step (int32, the draw's index)."""
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    seed: np.ndarray
    step: np.ndarray


@_pytree
class LoraTables:
    """Per LoRA tile: for each target the step computes, (rank [tiles], A^T page table, B page table);
    decode only: tile_rows [tiles, decode_tile], the batch rows each gathered tile holds."""
    targets: dict
    tile_rows: np.ndarray | None = None


@_pytree
class PrefillBatch:
    """Prompts packed in tiles of PREFILL_TILE tokens, one sequence per tile. Rows [N]: tokens,
    positions, write_k, write_v (pages their K/V go to); tiles [N/16]: tile_seq, tile_pos; sequences
    [S]: k_blocks, v_blocks [S, max_blocks], last_row, seq_slot, seq_lens; sampling per sequence."""
    tokens: np.ndarray
    positions: np.ndarray
    write_k: np.ndarray
    write_v: np.ndarray
    tile_seq: np.ndarray
    tile_pos: np.ndarray
    k_blocks: np.ndarray
    v_blocks: np.ndarray
    last_row: np.ndarray
    seq_slot: np.ndarray
    seq_lens: np.ndarray
    sampling: SamplingBatch
    lora: LoraTables


@_pytree
class DecodeBatch:
    """One row per running request [B]: its batch slot (its input token is the one the previous step
    left there), position, write_k, write_v; k_blocks, v_blocks [B, max_blocks]; sampling; LoRA on
    gathered tiles (rows grouped by adapter)."""
    slots: np.ndarray
    positions: np.ndarray
    write_k: np.ndarray
    write_v: np.ndarray
    k_blocks: np.ndarray
    v_blocks: np.ndarray
    sampling: SamplingBatch
    lora: LoraTables


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    kv_block: int
    max_blocks: int            # block-table width: max_model_len / kv_block
    max_batch: int             # batch slots; slot max_batch is the padding slot
    targets: tuple[str, ...]   # LoRA targets the step computes
    decode_tile: int = TILE    # decode rows per LoRA tile (rows grouped by adapter: pallas_kernels.lora)


def _adapter_slots(requests: list[Request], residency: AdapterResidency) -> list[int]:
    return [BASE_SLOT if r.adapter is None else residency.get(r.adapter.uid).slot for r in requests]


def _lora(residency: AdapterResidency, slots: np.ndarray, targets, tile_rows=None) -> LoraTables:
    return LoraTables({t: (residency.rank[t][slots], residency.a_pages[t][slots], residency.b_pages[t][slots])
                       for t in targets}, tile_rows)


def _sampling(requests: list[Request], n: int) -> SamplingBatch:
    out = SamplingBatch(np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32),
                        np.zeros(n, np.int32), np.zeros(n, np.int32))
    for i, r in enumerate(requests):
        sp = r.sampling
        out.temperature[i], out.top_p[i], out.top_k[i] = sp.temperature, sp.top_p, sp.top_k
        out.seed[i], out.step[i] = r.seed, len(r.generated) + r.pending
    return out


def _block_tables(requests: list[Request], n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    k, v = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    for i, r in enumerate(requests):
        k[i, : len(r.k_blocks)], v[i, : len(r.v_blocks)] = r.k_blocks, r.v_blocks
    return k, v


def _page(blocks: list[int], position: int, kv_block: int) -> int:
    return blocks[position // kv_block] * kv_block + position % kv_block


def decode_batch(requests: list[Request], batch: int, shapes: BatchShapes,
                 residency: AdapterResidency) -> DecodeBatch:
    """One row per request: it feeds the token at position num_computed (sampled by the previous step)."""
    bs = shapes.kv_block
    slots = np.full(batch, shapes.max_batch, np.int32)
    positions, write_k, write_v = (np.zeros(batch, np.int32) for _ in range(3))
    for i, r in enumerate(requests):
        p = r.num_computed
        slots[i], positions[i] = r.batch_slot, p
        write_k[i], write_v[i] = _page(r.k_blocks, p, bs), _page(r.v_blocks, p, bs)
    k_blocks, v_blocks = _block_tables(requests, batch, shapes.max_blocks)
    adapter_slots = np.full(batch, BASE_SLOT, np.int32)
    adapter_slots[: len(requests)] = _adapter_slots(requests, residency)
    # one tile per row at most (every row its own adapter); unused tiles get the base slot: rank 0
    tile_rows, tile_adapter = tiles_by_adapter(adapter_slots, batch, shapes.decode_tile, none=BASE_SLOT)
    return DecodeBatch(slots, positions, write_k, write_v, k_blocks, v_blocks, _sampling(requests, batch),
                       _lora(residency, tile_adapter, shapes.targets, tile_rows))


def prefill_batch(requests: list[Request], num_tokens: int, shapes: BatchShapes,
                  residency: AdapterResidency) -> PrefillBatch:
    """Requests' tokens packed in tiles of PREFILL_TILE rows, one sequence per tile; num_tokens rows
    in all, and num_tokens / PREFILL_TILE sequence entries (each sequence takes at least one tile)."""
    bs, tiles, seqs = shapes.kv_block, num_tokens // PREFILL_TILE, num_tokens // PREFILL_TILE
    tokens, positions, write_k, write_v = (np.zeros(num_tokens, np.int32) for _ in range(4))
    tile_seq = np.full(tiles, len(requests), np.int32)  # padding tiles: a padding sequence (null pages)
    tile_pos = np.zeros(tiles, np.int32)
    tile_adapter = np.full(tiles, BASE_SLOT, np.int32)
    last_row = np.zeros(seqs, np.int32)
    seq_lens = np.zeros(seqs, np.int32)  # padding sequences: no keys
    seq_slot = np.full(seqs, shapes.max_batch, np.int32)
    row = 0
    for s, (r, adapter_slot) in enumerate(zip(requests, _adapter_slots(requests, residency))):
        ids = r.all_ids
        n = len(ids)
        rows = slice(row, row + n)
        tokens[rows], positions[rows] = ids, np.arange(n)
        pos = np.arange(n)
        k = np.asarray(r.k_blocks, np.int32)[pos // bs] * bs + pos % bs
        v = np.asarray(r.v_blocks, np.int32)[pos // bs] * bs + pos % bs
        write_k[rows], write_v[rows] = k, v
        padded = round_up(n, PREFILL_TILE)
        positions[row + n: row + padded] = np.arange(n, padded)  # padding rows: written nowhere
        first = row // PREFILL_TILE
        count = padded // PREFILL_TILE
        tile_seq[first: first + count] = s
        tile_pos[first: first + count] = np.arange(count) * PREFILL_TILE
        tile_adapter[first: first + count] = adapter_slot
        last_row[s], seq_slot[s], seq_lens[s] = row + n - 1, r.batch_slot, n
        row += padded
    assert row <= num_tokens
    k_blocks, v_blocks = _block_tables(requests, seqs, shapes.max_blocks)
    return PrefillBatch(tokens, positions, write_k, write_v, tile_seq, tile_pos, k_blocks, v_blocks, last_row,
                        seq_slot, seq_lens, _sampling(requests, seqs), _lora(residency, tile_adapter, shapes.targets))
