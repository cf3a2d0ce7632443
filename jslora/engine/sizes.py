"""The engine's derived sizes, resolved once from the model and the EngineConfig (validated there), so
that no module derives them again: context length, the step's row budget, padded LoRA rank, step
buckets, and KV blocks for n tokens."""
from __future__ import annotations

import dataclasses

from jslora.config import ModelConfig
from jslora.engine.config import EngineConfig
from jslora.scheduler.rows import COMPUTE_BOUND_ROWS
from pallas_kernels.pool import TILE, cdiv, round_up

# cuBLAS appears to tile a GEMM's rows by 64 or 128 (the nvjet_*_128x64 / *_192x128 kernels of a batch-256
# step's profile), so buckets closer than this launch the same tiles: 224 rows cost what 256 do (H100: a tie)
MIN_BUCKET_STEP = 64


def quarter_octaves(lo: int, fine_from: int, hi: int) -> tuple[int, ...]:
    """Row counts lo..hi: powers of two up to fine_from, then four to an octave but at least MIN_BUCKET_STEP
    apart (128, 192, 256, 320, 384, 448, 512, 640, ...): above 256 a step pads at most a fifth of its rows."""
    out, x = [], lo
    while x < hi:
        out.append(x)
        x = x * 2 if x < fine_from else x + max(MIN_BUCKET_STEP, (1 << (x.bit_length() - 1)) // 4)
    return (*out, hi)


def default_buckets(max_batch: int, budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The compiled row counts of decode-only steps and of steps with prompt chunks. Padding a step's rows
    costs nothing where its matmuls are bound by reading the weights (up to ~170 rows on an H200, ~230 on an
    H100), and their time in proportion above: so powers of two up to 128 decode rows and 256 step rows
    (a decode batch of 2 shares the 4-row shape, small prefills the 16-64-row ones), then quarter-octaves.
    S1's mixed steps (~200 decode rows + ~360 prompt tokens) launched 768 rows in steps of 256; now 640
    (9.7% faster on an H100: benchmarks/RESULTS.md, thirty-eighth session)."""
    decode = (1, *quarter_octaves(4, 128, max_batch)) if max_batch > 4 else quarter_octaves(1, 128, max_batch)
    return decode, quarter_octaves(TILE, COMPUTE_BOUND_ROWS, budget)


def fit_buckets(shapes: tuple[int, ...], hi: int) -> tuple[int, ...]:
    """Configured row counts below hi, and hi itself (the largest step there can be)."""
    return (*(n for n in shapes if n < hi), hi)


def adapter_copy_sizes(num_pages: int) -> tuple[int, ...]:
    """Every copy size up to the one that holds num_pages pages: powers of two from TILE and 1.5x each
    (few compiled copy shapes, at most a third of a copy padding)."""
    sizes, x = [], TILE
    while not sizes or sizes[-1] < num_pages:
        sizes += [x] if x == TILE else [x * 3 // 4, x]
        x *= 2
    return tuple(s for i, s in enumerate(sizes) if i == 0 or sizes[i - 1] < num_pages)


def adapter_copy_pages(num_pages: int) -> int:
    """Pages an adapter's rows are padded to for the host -> pool copy (adapter_copy_sizes). The host
    tier keeps them padded, so a copy needs no repacking."""
    return next(s for s in adapter_copy_sizes(num_pages) if s >= num_pages)


@dataclasses.dataclass(frozen=True)
class EngineSizes:
    kv_block: int                 # pages per allocation block (TILE)
    max_model_len: int            # tokens per sequence, a whole number of KV blocks
    max_num_batched_tokens: int   # rows per step: decode rows (padded to a tile) + prompt chunks' tiles
    max_lora_rank: int            # the kernels' rank width: a multiple of TILE on every TP device
    max_batch: int
    decode_buckets: tuple[int, ...]   # rows of the decode-only step variants
    step_buckets: tuple[int, ...]     # rows of the variants with prompt chunks
    decode_lora_tile: int         # rows per gathered decode LoRA tile (1 under tensor parallelism)

    @classmethod
    def resolve(cls, cfg: ModelConfig, config: EngineConfig) -> EngineSizes:
        tp = config.tensor_parallel_size
        max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        max_model_len = round_up(max_model_len, config.kv_block)
        # room for a full decode batch beside one tile of a prompt, so prompts are never starved
        budget = max(round_up(config.max_num_batched_tokens, TILE), round_up(config.max_batch, TILE) + TILE)
        decode, steps = default_buckets(config.max_batch, budget)
        decode = fit_buckets(config.decode_buckets or decode, config.max_batch)
        steps = fit_buckets(config.step_buckets or steps, budget)
        return cls(kv_block=config.kv_block, max_model_len=max_model_len, max_num_batched_tokens=budget,
                   max_lora_rank=round_up(config.max_lora_rank, TILE * tp), max_batch=config.max_batch,
                   decode_buckets=decode, step_buckets=steps,
                   # under TP a tile per row: its LoRA all-gather then carries one row per token
                   decode_lora_tile=config.decode_lora_tile if tp == 1 else 1)

    @property
    def max_blocks(self) -> int:
        """Block-table width: blocks of one full-length sequence."""
        return self.max_model_len // self.kv_block

    def kv_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.kv_block)
