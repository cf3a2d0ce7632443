"""Host-side step batches: frozen pytree dataclasses of numpy arrays, padded to the step's bucket, for
jslora.model.paged's jitted steps (their fields are the steps' only inputs besides params and pool).

Padding rows point at the null block/page and at batch slot `max_batch` (out of range: their tokens
are dropped), so they read zeros and write nothing.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jslora.memory import AdapterResidency, BlockTables
from jslora.memory.adapter_residency import BASE_SLOT
from jslora.model.paged import PREFILL_TILE
from jslora.request import Chunk, Request, Status
from jslora.sampling import BIAS_WIDTH
from pallas_kernels.lora import tiles_by_adapter
from pallas_kernels.pool import TILE, round_up


def _pytree(cls):
    """A frozen dataclass whose fields are all pytree children (arrays, or pytrees of arrays)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                            meta_fields=[])


@_pytree
class SamplingBatch:
    """Per row: temperature, top_p (float32), top_k, seed and the row's step (int32, the draw's index);
    presence, frequency, repetition penalties (float32); bias_ids, bias_values [R, BIAS_WIDTH]: logit_bias,
    and -inf on EOS and stop ids while min_tokens is not reached (padding: id 0, value 0)."""
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    seed: np.ndarray
    step: np.ndarray
    presence: np.ndarray
    frequency: np.ndarray
    repetition: np.ndarray
    bias_ids: np.ndarray
    bias_values: np.ndarray


@_pytree
class LoraTables:
    """Per LoRA tile: for each target the step computes, (rank [tiles], A^T page table, B page table);
    decode only: tile_rows [tiles, decode_tile], the batch rows each gathered tile holds."""
    targets: dict
    tile_rows: np.ndarray | None = None


@_pytree
class DecodeRows:
    """The step's first R rows as decode rows (one per running request; R = min(rows, max_batch)):
    lens [R] (keys 0..lens-1, the new one included; 0: not a decode row, no attention work),
    k_blocks, v_blocks [R, max_blocks]; LoRA on gathered tiles (rows grouped by adapter)."""
    lens: np.ndarray
    k_blocks: np.ndarray
    v_blocks: np.ndarray
    lora: LoraTables


@_pytree
class PrefillTiles:
    """Prompt chunks in tiles of PREFILL_TILE rows, each tile within one sequence (tiles over decode
    rows or padding point at a sequence of length 0). tiles [rows / 16]: tile_seq, tile_pos (the
    position of the tile's first token); sequences [S = rows / 16]: seq_lens (tokens whose keys the
    chunk sees: its own and every cached one before it), k_blocks, v_blocks [S, max_blocks]; LoRA on
    the tiles (tile_rows: each tile's 16 consecutive rows). For the penalties' per-slot token state:
    reset_slot [S] (slots of requests whose first chunk this is: their state starts empty; max_batch:
    none), and per row mark_slot [N] (the slot a chunk row's token is recorded in; max_batch: none) and
    mark_generated [N] (a token the request generated before, recomputed after preemption: counted;
    otherwise a prompt token: marked seen)."""
    tile_seq: np.ndarray
    tile_pos: np.ndarray
    seq_lens: np.ndarray
    k_blocks: np.ndarray
    v_blocks: np.ndarray
    lora: LoraTables
    reset_slot: np.ndarray
    mark_slot: np.ndarray
    mark_generated: np.ndarray


@_pytree
class StepBatch:
    """One step: decode rows first, then prompt chunks (chunked prefill), in one launch so the
    weights are read once. Rows [N]: tokens (from the host), token_slot (a decode row's input is the
    token the previous step left in that batch slot on the device; max_batch: use `tokens`),
    positions, write_k, write_v (pages their K/V go to). Sampled rows [R]: sample_rows (rows whose
    logits are sampled: decode rows and each chunk that ends its prompt), sample_slot (the batch slot
    the token is kept in for the next step; max_batch: dropped), sampling. `prefill` is None in a
    decode-only step (its own compiled variant, no prefill work at all)."""
    tokens: np.ndarray
    token_slot: np.ndarray
    positions: np.ndarray
    write_k: np.ndarray
    write_v: np.ndarray
    sample_rows: np.ndarray
    sample_slot: np.ndarray
    sampling: SamplingBatch
    decode: DecodeRows
    prefill: PrefillTiles | None

    @property
    def num_rows(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    kv_block: int
    max_blocks: int            # block-table width: max_model_len / kv_block
    max_batch: int             # batch slots; slot max_batch is the padding slot
    targets: tuple[str, ...]   # LoRA targets the step computes
    decode_tile: int = TILE    # decode rows per LoRA tile (rows grouped by adapter: pallas_kernels.lora)
    eos_ids: tuple[int, ...] = ()  # the model's EOS ids (min_tokens masks them)


def _adapter_slots(requests: list[Request], residency: AdapterResidency) -> list[int]:
    return [BASE_SLOT if r.adapter is None else residency.get(r.adapter.uid).slot for r in requests]


def _lora(residency: AdapterResidency, slots: np.ndarray, targets, tile_rows=None) -> LoraTables:
    return LoraTables({t: (residency.rank[t][slots], residency.a_pages[t][slots], residency.b_pages[t][slots])
                       for t in targets}, tile_rows)


def _sampling(requests: list[Request], n: int, eos_ids: tuple[int, ...]) -> SamplingBatch:
    out = SamplingBatch(np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32),
                        np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32),
                        np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros((n, BIAS_WIDTH), np.int32),
                        np.zeros((n, BIAS_WIDTH), np.float32))
    if not requests:
        return out
    # column by column (a step has up to max_batch rows: per-row Python is the host's cost per step)
    sps, k = [r.sampling for r in requests], len(requests)
    steps = [len(r.generated) + r.pending for r in requests]
    out.temperature[:k] = [sp.temperature for sp in sps]
    out.top_p[:k] = [sp.top_p for sp in sps]
    out.top_k[:k] = [sp.top_k for sp in sps]
    out.seed[:k] = [r.seed for r in requests]
    out.step[:k] = steps
    out.presence[:k] = [sp.presence_penalty for sp in sps]
    out.frequency[:k] = [sp.frequency_penalty for sp in sps]
    out.repetition[:k] = [sp.repetition_penalty for sp in sps]
    for i, (sp, step) in enumerate(zip(sps, steps)):
        if sp.logit_bias is None and step >= sp.min_tokens:
            continue
        bias = dict(sp.logit_bias or {})
        if step < sp.min_tokens:  # nothing may end the request yet
            for token in (*(() if sp.ignore_eos else eos_ids), *sp.stop_token_ids):
                bias[token] = -np.inf
        out.bias_ids[i, : len(bias)] = list(bias)
        out.bias_values[i, : len(bias)] = list(bias.values())
    return out


def _block_tables(requests: list[Request], n: int, width: int,
                  tables: BlockTables | None = None) -> tuple[np.ndarray, np.ndarray]:
    if tables is not None:  # the scheduler's rows by batch slot
        return tables.rows([r.batch_slot for r in requests], n)
    k, v = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    for i, r in enumerate(requests):
        k[i, : len(r.k_blocks)], v[i, : len(r.v_blocks)] = r.k_blocks, r.v_blocks
    return k, v


def _pages(blocks: list[int], positions: np.ndarray, kv_block: int) -> np.ndarray:
    return np.asarray(blocks, np.int32)[positions // kv_block] * kv_block + positions % kv_block


def chunk_first_rows(num_decode: int, chunks: list[Chunk]) -> list[int]:
    """The step row each chunk starts at: after the decode rows, each chunk from a tile boundary."""
    rows, row = [], round_up(num_decode, PREFILL_TILE)
    for chunk in chunks:
        rows.append(row)
        row += round_up(chunk.length, PREFILL_TILE)
    return rows


@dataclasses.dataclass(frozen=True)
class PromptLogprobRows:
    """The step rows whose logits give prompt logprobs: rows [M] and the prompt token each is scored
    against, tokens [M]; owners [M]: (request, the scored token's prompt position)."""
    rows: np.ndarray
    tokens: np.ndarray
    owners: list

    def record(self, chosen: np.ndarray, top_ids: np.ndarray, top_values: np.ndarray) -> None:
        """Each row's (logprob, top ids, top logprobs), read back from row_logprobs, into its request's
        prompt_logprobs (finished requests are skipped)."""
        for row, (request, position) in enumerate(self.owners):
            if request.status is not Status.FINISHED:
                k = request.sampling.prompt_logprobs
                request.prompt_logprobs[position] = (float(chosen[row]), top_ids[row, :k].tolist(),
                                                     top_values[row, :k].tolist())


def prompt_logprob_rows(num_decode: int, chunks: list[Chunk]) -> PromptLogprobRows | None:
    """The chunks' rows whose requests ask for prompt logprobs (None if none does)."""
    rows, tokens, owners = [], [], []
    for chunk, first in zip(chunks, chunk_first_rows(num_decode, chunks)):
        ids = chunk.request.prompt_ids
        for position in chunk.prompt_logprob_positions():
            rows.append(first + position - chunk.start)
            tokens.append(ids[position + 1])
            owners.append((chunk.request, position + 1))
    if not rows:
        return None
    return PromptLogprobRows(np.asarray(rows, np.int32), np.asarray(tokens, np.int32), owners)


def decode_rows_for(num_rows: int, max_batch: int) -> int:
    """R: the rows of a step that may be decode rows (and the step's sampled rows)."""
    return min(num_rows, max_batch)


def step_batch(decode: list[Request], chunks: list[Chunk], num_rows: int, shapes: BatchShapes,
               residency: AdapterResidency, *, with_prefill: bool,
               block_tables: BlockTables | None = None) -> StepBatch:
    """The step's batch, padded to num_rows rows: decode rows 0 .. len(decode) - 1, then each chunk
    in whole tiles of PREFILL_TILE rows from the next multiple of PREFILL_TILE. with_prefill=False:
    the decode-only variant (no chunks allowed). block_tables: the scheduler's rows by batch slot (else
    the tables are built from the requests' block lists)."""
    assert with_prefill or not chunks
    bs, pad_slot = shapes.kv_block, shapes.max_batch
    n, r_rows = num_rows, decode_rows_for(num_rows, shapes.max_batch)
    tokens, positions, write_k, write_v = (np.zeros(n, np.int32) for _ in range(4))
    token_slot = np.full(n, pad_slot, np.int32)
    sample_rows = np.zeros(r_rows, np.int32)
    sample_slot = np.full(r_rows, pad_slot, np.int32)
    sampled: list[Request] = []

    # decode rows: each feeds the token at position num_computed (sampled by the step before); column by
    # column, as _sampling (up to max_batch rows a step: per-row Python is the host's cost per step)
    lens = np.zeros(r_rows, np.int32)
    k_blocks, v_blocks = _block_tables(decode, r_rows, shapes.max_blocks, block_tables)
    d = len(decode)
    p = np.fromiter((r.num_computed for r in decode), np.int32, d)
    token_slot[:d] = sample_slot[:d] = np.fromiter((r.batch_slot for r in decode), np.int32, d)
    positions[:d], lens[:d], sample_rows[:d] = p, p + 1, np.arange(d)
    rows, block, offset = np.arange(d), p // bs, p % bs
    write_k[:d], write_v[:d] = k_blocks[rows, block] * bs + offset, v_blocks[rows, block] * bs + offset
    sampled.extend(decode)
    adapter_slots = np.full(r_rows, BASE_SLOT, np.int32)
    adapter_slots[: len(decode)] = _adapter_slots(decode, residency)
    # one tile per row at most (every row its own adapter); unused tiles get the base slot: rank 0
    tile_rows, tile_adapter = tiles_by_adapter(adapter_slots, r_rows, shapes.decode_tile, none=BASE_SLOT)
    decode_rows = DecodeRows(lens, k_blocks, v_blocks, _lora(residency, tile_adapter, shapes.targets, tile_rows))

    prefill = None
    if with_prefill:
        tiles = n // PREFILL_TILE
        tile_seq = np.full(tiles, len(chunks), np.int32)  # not a chunk's tile: a sequence of no keys
        tile_pos = np.zeros(tiles, np.int32)
        tile_adapter = np.full(tiles, BASE_SLOT, np.int32)
        seq_lens = np.zeros(tiles, np.int32)
        reset_slot = np.full(tiles, pad_slot, np.int32)
        mark_slot = np.full(n, pad_slot, np.int32)
        mark_generated = np.zeros(n, bool)
        chunk_slots = _adapter_slots([c.request for c in chunks], residency)
        first_rows = chunk_first_rows(len(decode), chunks)
        for s, (chunk, adapter_slot, row) in enumerate(zip(chunks, chunk_slots, first_rows)):
            r, count = chunk.request, chunk.length
            pos = np.arange(chunk.start, chunk.start + count)
            rows = slice(row, row + count)
            tokens[rows] = r.all_ids[chunk.start: chunk.start + count]
            positions[rows] = pos
            write_k[rows], write_v[rows] = _pages(r.k_blocks, pos, bs), _pages(r.v_blocks, pos, bs)
            padded = round_up(count, PREFILL_TILE)
            positions[row + count: row + padded] = np.arange(pos[-1] + 1, pos[-1] + 1 + padded - count)
            first, num_tiles = row // PREFILL_TILE, padded // PREFILL_TILE
            tile_seq[first: first + num_tiles] = s
            tile_pos[first: first + num_tiles] = chunk.start + np.arange(num_tiles) * PREFILL_TILE
            tile_adapter[first: first + num_tiles] = adapter_slot
            seq_lens[s] = chunk.start + count
            if chunk.start == 0:
                reset_slot[s] = r.batch_slot
            mark_slot[rows] = r.batch_slot
            mark_generated[rows] = pos >= len(r.prompt_ids)
            if chunk.is_last:
                sample_rows[len(sampled)], sample_slot[len(sampled)] = row + count - 1, r.batch_slot
                sampled.append(r)
            assert row + padded <= n, f"{row + padded} rows do not fit a step of {n}"
        k_blocks, v_blocks = _block_tables([c.request for c in chunks], tiles, shapes.max_blocks, block_tables)
        tile_rows = (np.arange(tiles, dtype=np.int32)[:, None] * PREFILL_TILE
                     + np.arange(PREFILL_TILE, dtype=np.int32)[None, :])
        prefill = PrefillTiles(tile_seq, tile_pos, seq_lens, k_blocks, v_blocks,
                               _lora(residency, tile_adapter, shapes.targets, tile_rows),
                               reset_slot, mark_slot, mark_generated)
    assert len(sampled) <= r_rows
    return StepBatch(tokens, token_slot, positions, write_k, write_v, sample_rows, sample_slot,
                     _sampling(sampled, r_rows, shapes.eos_ids), decode_rows, prefill)


def sampled_requests(decode: list[Request], chunks: list[Chunk]) -> list[Request]:
    """The requests whose tokens a step samples, in the order of its sampled rows."""
    return list(decode) + [c.request for c in chunks if c.is_last]
