"""The unified page pool shared by the KV cache and LoRA weights (S-LoRA's unified paging, for GQA and MLP widths too).

One array `pool` of shape [num_layers * num_pages, page_width] (bf16 on the GPU). A page index p names
the same page in every layer: row `layer * num_pages + p`. The page width is the KV width of one token
in one layer (num_kv_heads * head_dim), so:
  - one token of KV takes two pages (its K row and its V row) and wastes nothing;
  - LoRA A is stored transposed: each of its r rows (width `in`) spans ceil(in / W) pages; B's r rows
    (width `out`) span ceil(out / W) pages. Only the tail page of a row can hold padding (zeros).
Page 0 is the reserved all-zero null page: padding entries of every page table point at it, so kernels
gather zeros instead of reading out of bounds (Triton treats indices as unsigned; -1 would be illegal).
"""
from __future__ import annotations

import dataclasses

import numpy as np

NULL_PAGE = 0
# One number that several things must agree on: pages per KV allocation block, tokens per prefill tile
# (one sequence and one adapter per tile), the LoRA kernels' rank block and rows per gathered decode
# LoRA tile. Triton's tensor-core dots need every dimension >= 16.
TILE = 16


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints (pallas_kernels.triton_compat.cdiv is the traced one)."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    num_layers: int
    num_pages: int
    page_width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers * self.num_pages, self.page_width)

    def chunks(self, width: int) -> int:
        """Pages one row of `width` elements spans."""
        return cdiv(width, self.page_width)

    def adapter_pages(self, module_shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
        """Pages an adapter needs: for each target of rank r, r * (chunks(in) + chunks(out))."""
        return sum(r * (self.chunks(module_shapes[t][0]) + self.chunks(module_shapes[t][1]))
                   for t, r in ranks.items())

    def padding_share(self, module_shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> float:
        """Share of an adapter's page bytes that are padding."""
        used = sum(r * (module_shapes[t][0] + module_shapes[t][1]) for t, r in ranks.items())
        return 1.0 - used / (self.adapter_pages(module_shapes, ranks) * self.page_width)

    def pack_adapter(self, weights: dict[str, tuple[np.ndarray, np.ndarray]], pages: np.ndarray,
                     out: np.ndarray | None = None):
        """Lay an adapter's weights out on the given pages.

        weights: target -> (A [L, in, r], B [L, r, out]) with the scale folded into B.
        pages: the adapter_pages(...) page ids it owns, in order.
        out: zeros [L, >= len(pages), W] of any dtype (a view will do) to write the page data into, cast
        once; by default a new float32 array.
        Returns (page_data [L, len(pages), W] (out's first pages), index) where index[target] =
        (a_pages [chunks_in, r], b_pages [chunks_out, r]): the page holding chunk c of row j of A^T
        (resp. B).
        """
        w = self.page_width
        data = np.zeros((self.num_layers, len(pages), w), np.float32) if out is None else out[:, :len(pages)]
        index, cursor = {}, 0
        for target, (a, b) in weights.items():
            tables = []
            for rows in (np.swapaxes(a, 1, 2), b):  # A^T [L, r, in], B [L, r, out]
                r, width = rows.shape[1], rows.shape[2]
                chunks = self.chunks(width)
                # local page k holds row j, chunk c for k = cursor + j * chunks + c; a last chunk's tail stays zero
                for c in range(chunks):
                    part = rows[:, :, c * w:(c + 1) * w]
                    data[:, cursor + c: cursor + r * chunks: chunks, :part.shape[2]] = part
                local = cursor + np.arange(r * chunks).reshape(r, chunks)
                tables.append(pages[local].T.astype(np.int32))  # [chunks, r]
                cursor += r * chunks
            index[target] = tuple(tables)
        assert cursor == len(pages), "pages must be exactly adapter_pages(...)"
        return data, index


def write_pages(pool, layout: PoolLayout, pages, page_data):
    """Functional write of page_data [L, n, W] onto `pages` in every layer (jit and donate the pool
    for an in-place copy). Entries naming the null page (padding) are dropped: it stays zero whatever
    the padding rows hold."""
    import jax.numpy as jnp

    pages = jnp.asarray(pages)
    rows = jnp.arange(layout.num_layers)[:, None] * layout.num_pages + pages[None]
    rows = jnp.where(pages[None] == NULL_PAGE, pool.shape[0], rows).reshape(-1)
    return pool.at[rows].set(jnp.asarray(page_data, pool.dtype).reshape(-1, layout.page_width), mode="drop")


def lora_page_table(tile_index: list, max_rank: int, chunks: int) -> np.ndarray:
    """Per-tile page table for one target's A or B: [tiles, chunks, max_rank], null page past a rank.

    tile_index[i] is the [chunks, r] table of tile i's adapter (or None for no adapter)."""
    table = np.full((len(tile_index), chunks, max_rank), NULL_PAGE, np.int32)
    for i, pages in enumerate(tile_index):
        if pages is not None:
            table[i, :, : pages.shape[1]] = pages
    return table
