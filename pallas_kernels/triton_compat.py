"""Every Triton-specific call of the kernels lives here, so a move to Mosaic GPU stays local.

Pallas selects its Triton lowering only when Triton compiler params are passed (otherwise jax 0.11 picks
Mosaic GPU); `interpret=True` runs the same kernels on the CPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def pallas_call(kernel, *, out_shape, grid, interpret: bool, num_warps: int = 4, num_stages: int = 2,
                input_output_aliases=None, name: str | None = None):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret,
        input_output_aliases=input_output_aliases or {}, name=name,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def contract_last(a, b):
    """a [m, k] x b [n, k] -> [m, n] in float32: a tensor-core dot where Triton allows one (every dim
    >= 16), otherwise multiply-and-sum (decode: one token, or narrow rank blocks)."""
    if min(a.shape[0], b.shape[0], a.shape[1]) >= 16:
        return dot(a, b, trans_b=True)
    return jnp.sum(a.astype(jnp.float32)[:, None, :] * b.astype(jnp.float32)[None, :, :], axis=-1)


def dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """A tensor-core dot (every dim >= 16) in float32, either operand transposed."""
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b).astype(jnp.float32)


def contract_middle(a, b):
    """a [m, k] x b [k, n] -> [m, n] in float32 (dot where allowed, else multiply-and-sum)."""
    if min(a.shape[0], a.shape[1], b.shape[1]) >= 16:
        return dot(a, b)
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :], axis=1)


def default_interpret() -> bool:
    return jax.default_backend() != "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """A kernel's `interpret` argument: as given, or default_interpret() when None."""
    return default_interpret() if interpret is None else interpret


def div(a, b: int):
    """Integer division of non-negative traced ints: lax.div, since jnp's floor division and remainder
    lower to a mix of i32 and i1 that the Triton lowering of jax 0.11 rejects."""
    return jax.lax.div(a, jnp.asarray(b, jnp.int32))


def cdiv(a, b: int):
    return div(a + (b - 1), b)


def power_of_two_block(*divides: int, cap: int) -> int:
    """The largest power of two <= cap dividing every one of `divides`: Triton blocks must be powers
    of two, and Llama-13B's 5120-wide rows are not."""
    g = functools.reduce(math.gcd, divides)
    return min(cap, g & -g)


def store_rows(ref, rows, cols, value, mask=None):
    """ref[rows[i], cols[j]] = value[i, j] where mask[i, j] (a scatter of whole rows; both indices as
    arrays, the form interpret mode can discharge)."""
    pltriton.store(ref.at[rows[:, None], cols[None, :]], value, mask=mask)


def load(ref, mask=None, other=None):
    """A masked load of a ref view: masked-off elements read as `other` and touch no memory."""
    return pltriton.load(ref, mask=mask, other=other)


def atomic_add(ref, index, value):
    """ref[index] += value, atomically across programs (acquire-release, device scope); -> the old value."""
    return pltriton.atomic_add(ref, index, value)


def debug_barrier(interpret: bool):
    """Every thread of the program reaches here before any goes on (orders its memory operations); nothing
    in interpret mode, where a program is one thread."""
    if not interpret:
        pltriton.debug_barrier()


def store(ref, value, mask=None):
    pltriton.store(ref, value, mask=mask)


# waits until the kernels this launch depends on have finished and their writes are visible, then passes its
# operand on (the asm is pure to the compiler: it runs because its result is used)
_GRID_WAIT = "griddepcontrol.wait;\n\tmov.b32 $0, $1;"


def after_grid_wait(index, interpret: bool):
    """index (int32, any shape) after PTX's griddepcontrol.wait (sm_90+): used in the addresses of a kernel's
    reads of other kernels' outputs, it orders them after the wait, so XLA may launch the kernel while the one
    before it drains (programmatic dependent launch; benchmarks/pdl_probe.py tests whether XLA does). A
    no-op where the launch was not early, and in interpret mode (index as it is)."""
    if interpret:
        return index
    index = jnp.asarray(index, jnp.int32)
    # a scalar goes through as a one-element tensor: the asm's scalar result lowers as a 0-d tensor, which
    # Triton's address arithmetic cannot broadcast; a max over one element gives the scalar back
    vector = index.reshape(1) if index.ndim == 0 else index
    [out] = pltriton.elementwise_inline_asm(_GRID_WAIT, args=[vector], constraints="=r,r", pack=1,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(vector.shape, jnp.int32)])
    return jnp.max(out) if index.ndim == 0 else out
