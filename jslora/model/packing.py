"""A step's host metadata in two buffers: every int and bool leaf of a StepBatch in one int32 array,
every float leaf in one float32 array.

A jitted call copies each NumPy argument to the device on its own (one host-to-device transfer each);
a StepBatch has 30-50 small leaves, so on a GPU those copies were a large part of the host's time per
step. pack_batch concatenates them on the host (microseconds); unpack_batch slices them back inside the
jitted step, where the slices are free. The layout (tree structure, and each leaf's buffer, offset,
shape and dtype) is static: it is fixed by the batch's shapes, which select the compiled variant anyway.
"""
from __future__ import annotations

import jax
import numpy as np

INTS, FLOATS = 0, 1


def pack_batch(batch) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """StepBatch (NumPy leaves) -> ((int32 buffer, float32 buffer), static layout)."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    parts: tuple[list, list] = ([], [])
    sizes = [0, 0]
    entries = []
    for leaf in leaves:
        leaf = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)
        kind = FLOATS if leaf.dtype.kind == "f" else INTS
        parts[kind].append(leaf.ravel())
        entries.append((kind, sizes[kind], leaf.shape, leaf.dtype))
        sizes[kind] += leaf.size
    buffers = tuple(np.concatenate(p).astype(dtype, copy=False) if p else np.zeros(0, dtype)
                    for p, dtype in zip(parts, (np.int32, np.float32)))
    return buffers, (treedef, tuple(entries))


def unpack_batch(buffers, layout):
    """The inverse of pack_batch, inside a jitted function: the batch's leaves as slices of the buffers."""
    treedef, entries = layout
    leaves = []
    for kind, offset, shape, dtype in entries:
        size = int(np.prod(shape, dtype=np.int64))
        leaf = jax.lax.slice_in_dim(buffers[kind], offset, offset + size).reshape(shape)
        leaves.append(leaf != 0 if dtype == np.bool_ else leaf.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
