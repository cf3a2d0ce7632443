"""S-LoRA's partition of the LoRA weights under tensor parallelism (host side).

Column-parallel targets (q, k, v, gate, up; the input is replicated, the output split by columns):
device d holds A's rank columns d*r_loc .. (d+1)*r_loc (r_loc = ceil(r / tp), zero-padded) and B's
rows for every rank, cut to its output columns. Each device's x @ A_d is a [tokens, r_loc] slice of
x @ A; one all-gather of those slices ([tokens, r]) lets every device finish with its own columns of
(x @ A) @ B, lined up with the base output's partition.

Row-parallel targets (o, down; the input is split by rows): device d holds A's rows of its input
slice and all of B. x_d @ A_d is a partial sum of x @ A, so x_d @ A_d @ B is a partial sum of the
LoRA output: it is added to the base partial sum and rides on the base model's all-reduce. No extra
collective.

All devices hold the same number of pages per adapter, so an adapter owns the same page ids on every
device and one page table serves them all; a page's columns on device d hold device d's slice.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jslora.config import ModelConfig
from jslora.parallel.tensor_parallel import COLUMN_PARALLEL
from pallas_kernels.pool import PoolLayout, cdiv


def is_column_parallel(target: str) -> bool:
    return target in COLUMN_PARALLEL


class LocalShapes(NamedTuple):
    """One device's share of a target's LoRA weights, as rows laid on pool pages."""
    rows_a: int    # rows of A^T (rank columns of A) on this device
    width_a: int   # their width (input features on this device)
    rows_b: int    # rows of B on this device
    width_b: int   # their width (output features on this device)


class LoraPartition:
    """Every question about S-LoRA's LoRA split over `tp` devices, for one model and one pool layout:
    what each device holds, how many pages an adapter takes, how it is packed, and where the rows of B
    sit in the expand kernel's page table."""

    def __init__(self, cfg: ModelConfig, layout: PoolLayout, tp: int, max_rank: int):
        """layout: the pool's (global) layout; each device holds layout.page_width / tp of every page."""
        self.cfg, self.tp, self.max_rank = cfg, tp, max_rank
        self.local_layout = PoolLayout(layout.num_layers, layout.num_pages, layout.page_width // tp)

    def local_rank(self, rank: int) -> int:
        return cdiv(rank, self.tp)

    def local_shapes(self, target: str, rank: int) -> LocalShapes:
        fan_in, fan_out = self.cfg.module_shape(target)
        if is_column_parallel(target):
            r_loc = self.local_rank(rank)
            return LocalShapes(r_loc, fan_in, self.tp * r_loc, fan_out // self.tp)
        return LocalShapes(rank, fan_in // self.tp, rank, fan_out)

    def chunks(self, target: str) -> tuple[int, int]:
        """Pages per row of A^T and per row of B, on one device."""
        shapes = self.local_shapes(target, 1)
        return self.local_layout.chunks(shapes.width_a), self.local_layout.chunks(shapes.width_b)

    def a_table_width(self, target: str) -> int:
        """Rank columns of a target's A page table: one device's share when the rank is split."""
        return self.max_rank // self.tp if is_column_parallel(target) else self.max_rank

    def pages_needed(self, ranks: dict[str, int]) -> int:
        """Pages an adapter with these per-target ranks owns (the same page ids on every device)."""
        total = 0
        for target, rank in ranks.items():
            s = self.local_shapes(target, rank)
            total += s.rows_a * self.local_layout.chunks(s.width_a) + s.rows_b * self.local_layout.chunks(s.width_b)
        return total

    def device_weights(self, weights: dict, device: int) -> dict:
        """One device's LoRA weights in PoolLayout.pack_adapter's form: target -> (A [L, in_loc, rows_a],
        B [L, rows_b, out_loc]), B scaled as given."""
        tp, local = self.tp, {}
        if tp == 1:  # every device's share is the whole adapter
            return weights
        for target, (a, b) in weights.items():
            rank = a.shape[-1]
            if is_column_parallel(target):
                r_loc = self.local_rank(rank)
                a_pad = np.zeros(a.shape[:2] + (tp * r_loc,), a.dtype)
                a_pad[..., :rank] = a
                b_pad = np.zeros((b.shape[0], tp * r_loc, b.shape[2]), b.dtype)
                b_pad[:, :rank] = b
                cols = b.shape[2] // tp
                local[target] = (a_pad[..., device * r_loc:(device + 1) * r_loc],
                                 b_pad[:, :, device * cols:(device + 1) * cols])
            else:
                rows = a.shape[1] // tp
                local[target] = (a[:, device * rows:(device + 1) * rows], b)
        return local

    def pack(self, weights: dict, pages: np.ndarray, out: np.ndarray | None = None):
        """Lay the adapter out on `pages` for every device: (page_data [L, n, tp * W_local], index), device
        d's data in columns d*W_local ..; index[target] = (a [chunks, rows_a], b [chunks, rows_b]).
        out: zeros [L, >= n, tp * W_local] to write into (in its dtype: one pass over the bytes)."""
        width = self.local_layout.page_width
        if out is None:
            out = np.zeros((self.local_layout.num_layers, len(pages), self.tp * width), np.float32)
        index = None
        for device in range(self.tp):
            _, idx = self.local_layout.pack_adapter(self.device_weights(weights, device), pages,
                                                    out[:, :, device * width:(device + 1) * width])
            index = index or idx
        return out[:, :len(pages)], index

    def expand_positions(self, target: str, rows_b: int) -> np.ndarray:
        """Where B's rows sit in an expand page table of width max_rank: for a column-parallel target
        the gathered [tokens, tp * (max_rank / tp)] shrink output has device d's slice at
        d * max_rank / tp, so B row d * r_loc + j goes to column d * max_rank / tp + j."""
        if not is_column_parallel(target) or self.tp == 1:
            return np.arange(rows_b)
        r_loc, stride = rows_b // self.tp, self.max_rank // self.tp
        return (np.arange(rows_b) // r_loc) * stride + np.arange(rows_b) % r_loc
