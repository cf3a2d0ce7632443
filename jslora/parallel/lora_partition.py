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

import numpy as np

from jslora.config import ModelConfig
from jslora.parallel.tensor_parallel import COLUMN_PARALLEL
from pallas_kernels.pool import PoolLayout


def local_rank(rank: int, tp: int) -> int:
    return -(-rank // tp)


def local_shapes(cfg: ModelConfig, target: str, rank: int, tp: int) -> tuple[int, int, int, int]:
    """(rows of A^T, their width, rows of B, their width) on one device."""
    fan_in, fan_out = cfg.module_shape(target)
    if target in COLUMN_PARALLEL:
        r_loc = local_rank(rank, tp)
        return r_loc, fan_in, tp * r_loc, fan_out // tp
    return rank, fan_in // tp, rank, fan_out


def pages_needed(cfg: ModelConfig, local_layout: PoolLayout, ranks: dict[str, int], tp: int) -> int:
    total = 0
    for target, rank in ranks.items():
        rows_a, width_a, rows_b, width_b = local_shapes(cfg, target, rank, tp)
        total += rows_a * local_layout.chunks(width_a) + rows_b * local_layout.chunks(width_b)
    return total


def device_weights(weights: dict, tp: int, device: int) -> dict:
    """One device's LoRA weights in pack_adapter's form: target -> (A [L, in_loc, rows_a],
    B [L, rows_b, out_loc]), B scaled as given."""
    local = {}
    for target, (a, b) in weights.items():
        rank = a.shape[-1]
        if target in COLUMN_PARALLEL:
            r_loc = local_rank(rank, tp)
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


def pack_adapter(weights: dict, pages: np.ndarray, local_layout: PoolLayout, tp: int):
    """Lay the adapter out on `pages` for every device: (page_data [L, n, tp * W_local], index), device
    d's data in columns d*W_local ..; index[target] = (a [chunks, rows_a], b [chunks, rows_b])."""
    data, index = [], None
    for device in range(tp):
        d, idx = local_layout.pack_adapter(device_weights(weights, tp, device), pages)
        data.append(d)
        index = index or idx
    return np.concatenate(data, axis=-1), index


def expand_positions(target: str, rows_b: int, tp: int, max_rank: int) -> np.ndarray:
    """Where B's rows sit in an expand page table of width max_rank: for a column-parallel target
    the gathered [tokens, tp * (max_rank / tp)] shrink output has device d's slice at
    d * max_rank / tp, so B row d * r_loc + j goes to column d * max_rank / tp + j."""
    if target not in COLUMN_PARALLEL or tp == 1:
        return np.arange(rows_b)
    r_loc, stride = rows_b // tp, max_rank // tp
    return (np.arange(rows_b) // r_loc) * stride + np.arange(rows_b) % r_loc
