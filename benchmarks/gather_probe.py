"""Where the LoRA shrink's time goes at S1's shapes: the same reads without the rest (issues 17 and 22).

    PYTHONPATH=. python benchmarks/gather_probe.py            # H200: writes $OUT/gather_probe.json
    PYTHONPATH=. python benchmarks/gather_probe.py --quick    # CPU: interpret mode, checks every probe

The shrink at S1's q, k, v (240 decode rows, 226 rank-8 adapters) reads 44 MB of adapter rows in ~22 µs
from L2 and ~23-25 µs from HBM (~1.9 TB/s against a ~4.2 TB/s copy), as does the expand. Each probe below is a Pallas
kernel on the shrink's grid (tile x target x split of the input features) that reads what the shrink
reads, or a part of it, and sums it, or its products with x: the difference between two probes is what
one ingredient costs.

- pages_masked:   the shrink's reads: per step a [16, 256] block of A^T rows by page id, the 8 rows past
                  the rank masked off (no memory read).
- pages_all16:    the same, the null-page half read too (twice the bytes, same programs).
- rank_block8:    [8, 256] blocks: the live rows only, no masks.
- contiguous:     the same bytes per program as pages_masked, rows next to each other (no page table).
- one_split:      pages_masked in one program per (tile, target): 4x fewer, 4x longer programs.
- x_fma:          pages_masked times the tile's first row of x (its id read from the row table), products
                  summed elementwise and reduced once: the shrink's one-row work, unrolled.
- x_fma_bcast:    x_fma with x's row loaded as [16, 256] in the gathered block's layout (16 copies, from L1),
                  where x_fma's [1, 256] row is broadcast through shared memory each step.
- x_dot:          the same products as tensor-core dots of the row's 16 copies (one_row_dot), unrolled.
- x_dot_loop:     x_dot in a fori_loop that Triton software-pipelines (3 stages), as the shrink walks.
- x_dot_loop_one: x_dot_loop in one program per (tile, target), 16 steps: the shrink's one-row tiles
                  (only split 0 of an unsplit one-row tile walks).
- shrink:         the engine's lora_shrink itself (x, products, partial sums written), and beside it
                  variants of its tiling (SHRINKS).
- expand:         the engine's lora_expand on that shrink's output (B's rows, y read and written; the bytes
                  column counts B's), and variants of its tiling (EXPANDS).

Device µs per kernel from a profiler trace (dispatch and loop overhead excluded); bytes are those a
program reads; the copy rate is measured in the same run (benchmarks/common.rooflines). Every kernel is
timed twice: called back to back (the 44 MB of adapter rows partly in the 50 MB L2) and after a 256 MB
read each ("us HBM": read from memory, as inside a step; a read, so L2 holds no dirty lines to write back).
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.common import environment, rooflines, write_json
from benchmarks.lora_tune import PROBLEMS, build, device_us
from jslora.model.backend import lora_tiling
from pallas_kernels.lora import lora_apply_group
from pallas_kernels.lora_expand import lora_expand
from pallas_kernels.lora_shrink import lora_shrink
from pallas_kernels.pool import TILE
from pallas_kernels.triton_compat import contract_last, load, pallas_call

K_BLOCK = 256
# name: (rows per block, masked past the rank, contiguous rows, input-feature splits, products with x
# (None: plain sums, "fma": elementwise, "dot": tensor-core dots), walked in a pipelined loop)
# lora_shrink over the engine's tiling: as the engine runs it, one-row tiles on 16-row dots (the engine's
# before the eighteenth session), and one-row tiles split over the input features too
SHRINKS = {"shrink": {}, "shrink_split": dict(split_rows=True), "shrink_fma": dict(one_row_fma=True)}
# lora_expand over the engine's tiling, on the engine's shrink's v: as the engine runs it; and over [16, 1024]
# blocks with v read in B's layout
EXPANDS = {"expand": {}, "expand_fma_1024": dict(one_row_fma=True, out_block=1024, out_loop=1)}
# the whole group (shrink and expand, every launch) over the engine's tiling: as the engine runs it, and with
# one-row tiles in launches of their own (kind_launches), on dots or elementwise, their expand 1 or 4 blocks a
# program
GROUPS = {"group": {}, "group_kinds": dict(kind_launches=True),
          "group_kinds_fma": dict(kind_launches=True, one_row_fma=True, expand_one_row_fma=True),
          "group_kinds_fma_split": dict(kind_launches=True, one_row_fma=True, expand_one_row_fma=True, split_rows=True),
          "group_kinds_fma_loop4": dict(kind_launches=True, one_row_fma=True, expand_one_row_fma=True,
                                        one_row_out_loop=4),
          # one-row tiles' shrink and expand in one program per (tile, target): pallas_kernels.lora_fused
          "group_fused": dict(fused_one_row=True), "group_fused_d8": dict(fused_one_row=True, fused_depth=8),
          "group_fused_d2": dict(fused_one_row=True, fused_depth=2),
          "group_fused_b256": dict(fused_one_row=True, fused_block=256, fused_depth=8),
          "group_fused_w8": dict(fused_one_row=True, fused_warps=8, fused_depth=8),
          "group_fused_b1024w8": dict(fused_one_row=True, fused_block=1024, fused_warps=8, fused_depth=4)}
# lora_apply_group's keywords -> lora_expand's
EXPAND_OPTIONS = {"split_rows": "split_rows", "expand_one_row_dot": "one_row_dot", "expand_one_row_fma": "one_row_fma",
                  "out_block": "out_block", "out_loop": "out_loop", "loads_first": "loads_first",
                  "mask_rank": "mask_rank", "early_pages": "early_pages"}
PROBES = {"pages_masked": (16, True, False, 4, None, False), "pages_all16": (16, False, False, 4, None, False),
          "rank_block8": (8, False, False, 4, None, False), "contiguous": (16, True, True, 4, None, False),
          "one_split": (16, True, False, 1, None, False), "x_fma": (16, True, False, 4, "fma", False),
          "x_dot": (16, True, False, 4, "dot", False), "x_dot_loop": (16, True, False, 4, "dot", True),
          "x_dot_loop_one": (16, True, False, 1, "dot", True), "x_fma_bcast": (16, True, False, 4, "fma_bcast", False)}


def _probe_kernel(rank_ref, pages_ref, rows_ref, x_ref, pool_ref, out_ref, *, rb, masked, contiguous, x_mode, loop,
                  num_targets, max_rank, steps, splits, base, pool_rows):
    tile, target, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    program = (tile * num_targets + target) * splits + split
    rank = rank_ref[tile * num_targets + target]
    if contiguous:  # the (tile, target)'s own rows, side by side: the same bytes with no page table
        rows = _contiguous_first(tile * num_targets + target, rb, pool_rows) + jnp.arange(rb)
    else:
        rows = base + pages_ref[pl.ds((tile * num_targets + target) * max_rank, rb)]
    live = jnp.arange(rb) < rank
    x_row = rows_ref[tile * TILE]  # the tile's first row of x

    def step(i, acc):
        first = (split * steps + i) * K_BLOCK
        ref = pool_ref.at[rows[:, None], (first + jnp.arange(K_BLOCK))[None, :]]
        block = load(ref, mask=jnp.broadcast_to(live[:, None], (rb, K_BLOCK)), other=0) if masked else load(ref)
        if x_mode is None:
            return acc + block.astype(jnp.float32)
        if x_mode == "fma_bcast":  # x's row loaded in the block's own layout: no trip through shared memory
            x = load(x_ref.at[jnp.full((rb, 1), x_row), (first + jnp.arange(K_BLOCK))[None, :]],
                     mask=jnp.broadcast_to(live[:, None], (rb, K_BLOCK)), other=0)
            return acc + block.astype(jnp.float32) * x.astype(jnp.float32)
        x = x_ref[pl.ds(x_row, 1), pl.ds(first, K_BLOCK)]
        if x_mode == "fma":
            return acc + block.astype(jnp.float32) * x.astype(jnp.float32)
        return acc + contract_last(jnp.broadcast_to(x, (TILE, K_BLOCK)), block)

    @pl.when(rank > 0)
    def _():
        # unrolled: every step's load can be issued before the first add (a loop of plain loads is not
        # software-pipelined by Triton; one feeding dots is, the loop variant)
        acc = jnp.zeros((TILE, rb) if x_mode == "dot" else (rb, K_BLOCK), jnp.float32)
        if loop:
            acc = jax.lax.fori_loop(0, steps, step, acc)
        else:
            for i in range(steps):
                acc = step(i, acc)
        out_ref[program, :] = jnp.max(acc, axis=0) if x_mode == "dot" else jnp.sum(acc, axis=1)


def _contiguous_first(block, rb: int, pool_rows: int):
    return (block * rb) % (pool_rows // rb * rb)


def probe(name: str, tile_rank, a_pages, tile_rows, x, pool, *, layer_base: int, interpret: bool):
    """The probe's [programs, rb] row sums (float32), for tile_rank [tiles, T], a_pages [tiles, 1, T * R],
    tile_rows [tiles, 16] and x [N, in]."""
    rb, masked, contiguous, splits, x_mode, loop = PROBES[name]
    tiles, num_targets = tile_rank.shape
    max_rank = a_pages.shape[-1] // num_targets
    steps = pool.shape[1] // K_BLOCK // splits
    kernel = functools.partial(_probe_kernel, rb=rb, masked=masked, contiguous=contiguous, x_mode=x_mode, loop=loop,
                               num_targets=num_targets, max_rank=max_rank, steps=steps, splits=splits,
                               base=layer_base, pool_rows=pool.shape[0])
    programs = tiles * num_targets * splits
    return pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((programs, rb), jnp.float32),
                       grid=(tiles, num_targets, splits), interpret=interpret, num_stages=3, name=f"probe_{name}")(
        tile_rank.reshape(-1), a_pages.reshape(-1), tile_rows.reshape(-1), x, pool)


def expected(name: str, tile_rank, a_pages, tile_rows, x, pool, layer_base: int) -> np.ndarray:
    """What the probe must return (NumPy, float64); NaN for the programs of empty tiles (never written)."""
    rb, masked, contiguous, splits, x_mode, _ = PROBES[name]
    tiles, num_targets = tile_rank.shape
    max_rank = a_pages.shape[-1] // num_targets
    pool = np.asarray(pool, np.float64)
    x = np.asarray(x, np.float64)
    width = pool.shape[1] // splits
    out = np.full((tiles * num_targets * splits, rb), np.nan)
    for tile in range(tiles):
        for t in range(num_targets):
            rank = tile_rank[tile, t]
            if rank <= 0:
                continue
            for split in range(splits):
                program = (tile * num_targets + t) * splits + split
                rows = (_contiguous_first(tile * num_targets + t, rb, pool.shape[0]) + np.arange(rb) if contiguous
                        else layer_base + a_pages[tile, 0, t * max_rank: t * max_rank + rb])
                cols = slice(split * width, (split + 1) * width)
                weights = 1.0 if x_mode is None else x[tile_rows[tile, 0], cols]
                sums = (pool[rows, cols] * weights).sum(axis=1)
                out[program] = np.where(np.arange(rb) < rank, sums, 0.0) if masked else sums
    return out


def bytes_read(name: str, tile_rank, width: int, itemsize: int) -> int:
    rb, masked = PROBES[name][:2]
    live = tile_rank[tile_rank > 0]
    rows = np.minimum(live, rb).sum() if masked or rb == 8 else rb * live.size
    return int(rows) * width * itemsize


# plain gathers of the adapter rows a one-row tile's shrink reads, in other shapes: name -> (tiles a program
# takes (2: two tiles' 8 live rows fill one [16, k] block), input features a step, splits of the input
# features over programs, warps a program). How many bytes a step and a program put in flight, not the work.
GATHERS = {"g8_k256_s4": (1, 256, 4, 4), "g8_k1024_s4": (1, 1024, 4, 4), "g8_k256_s1": (1, 256, 1, 4),
           "g8_k256_s4_w8": (1, 256, 4, 8), "g16pair_k256_s4": (2, 256, 4, 4), "g16pair_k1024_s4": (2, 1024, 4, 4),
           "g16pair_k256_s1": (2, 256, 1, 4), "g16pair_k256_s4_w2": (2, 256, 4, 2)}
LIVE = 8  # rank 8: a tile's live rows


def _gather_kernel(rank_ref, pages_ref, pool_ref, out_ref, *, per_program, kb, steps, splits, num_targets, max_rank,
                   base):
    unit, target, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = jnp.arange(per_program * LIVE)
    tile = unit * per_program + r // LIVE                       # each row's tile
    live = (r % LIVE) < load(rank_ref.at[tile * num_targets + target])
    rows = base + load(pages_ref.at[(tile * num_targets + target) * max_rank + r % LIVE])
    acc = jnp.zeros((per_program * LIVE, kb), jnp.float32)
    for i in range(steps):  # unrolled: every step's gather can be issued before the first add
        cols = (split * steps + i) * kb + jnp.arange(kb)
        acc += load(pool_ref.at[rows[:, None], cols[None, :]], mask=jnp.broadcast_to(live[:, None], acc.shape),
                    other=0).astype(jnp.float32)
    out_ref[(unit * num_targets + target) * splits + split, :] = jnp.sum(acc, axis=1)


def gather(name: str, tile_rank, a_pages, pool, *, layer_base: int, interpret: bool):
    """GATHERS[name]'s row sums [programs, rows a program]: tiles beyond an even count and ranks past 8 unread."""
    per_program, kb, splits, warps = GATHERS[name]
    tiles, num_targets = tile_rank.shape
    units = tiles // per_program
    kb = min(kb, pool.shape[1] // splits)  # --quick's narrow rows
    steps = pool.shape[1] // kb // splits
    kernel = functools.partial(_gather_kernel, per_program=per_program, kb=kb, steps=steps, splits=splits,
                               num_targets=num_targets,
                               max_rank=a_pages.shape[-1] // num_targets, base=layer_base)
    return pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((units * num_targets * splits, per_program * LIVE),
                                                              jnp.float32),
                       grid=(units, num_targets, splits), interpret=interpret, num_warps=warps,
                       name=f"probe_{name}")(tile_rank.reshape(-1), a_pages.reshape(-1), pool)


def gather_expected(name: str, tile_rank, a_pages, pool, layer_base: int) -> np.ndarray:
    per_program, kb, splits, _ = GATHERS[name]
    tiles, num_targets = tile_rank.shape
    max_rank = a_pages.shape[-1] // num_targets
    pool = np.asarray(pool, np.float64)
    width = pool.shape[1] // splits
    out = np.zeros((tiles // per_program * num_targets * splits, per_program * LIVE))
    for unit in range(tiles // per_program):
        for t in range(num_targets):
            for split in range(splits):
                for j in range(per_program):
                    tile = unit * per_program + j
                    rows = layer_base + a_pages[tile, 0, t * max_rank: t * max_rank + LIVE]
                    sums = pool[rows, split * width:(split + 1) * width].sum(axis=1)
                    out[(unit * num_targets + t) * splits + split, j * LIVE:(j + 1) * LIVE] = np.where(
                        np.arange(LIVE) < tile_rank[tile, t], sums, 0.0)
    return out


# contiguous reads of one array per launch, at the sizes a step's LoRA kernels read (S1's o: 15 MB, q, k, v:
# 44 MB) and larger: what one launch of that many bytes takes from HBM, the floor's own overheads included
SIZES_MB = (15, 44, 88, 176, 704)
READ_ROWS, READ_STEP = 8, 1024


def _read_kernel(a_ref, out_ref):
    rows = pl.ds(pl.program_id(0) * READ_ROWS, READ_ROWS)
    acc = jnp.zeros((READ_ROWS, READ_STEP), jnp.float32)
    for i in range(a_ref.shape[1] // READ_STEP):  # unrolled: every step's read issued before the first add
        acc += a_ref[rows, pl.ds(i * READ_STEP, READ_STEP)].astype(jnp.float32)
    out_ref[rows] = jnp.sum(acc, axis=1)


def read_pallas(a, interpret: bool):
    """Row sums of a [n, 4096] by READ_ROWS rows a program (64 KB of bf16)."""
    return pallas_call(_read_kernel, out_shape=jax.ShapeDtypeStruct((a.shape[0],), jnp.float32),
                       grid=(a.shape[0] // READ_ROWS,), interpret=interpret, name="probe_read")(a)


def size_rows(hidden: int, on_gpu: bool, rng) -> list[dict]:
    rows = []
    for mb in SIZES_MB if on_gpu else (1, 2):
        n = mb * 2**20 // (hidden * 2) // READ_ROWS * READ_ROWS
        a = jnp.asarray(rng.standard_normal((n, hidden)), jnp.bfloat16)
        want = np.asarray(a, np.float64).sum(axis=1)
        for label, fn, kernel in (("read_pallas", jax.jit(lambda a: read_pallas(a, not on_gpu)), "probe_read"),
                                  ("read_xla", jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)), "")):
            got = np.asarray(fn(a), np.float64)
            error = float(np.abs(got - want).max() / np.abs(want).max())
            assert error < 1e-2, f"{label} {mb} MB: off by {error:.2e}"
            rows.append(timed_row(f"{mb}MB", label, fn, (a,), kernel, n * hidden * 2, error, on_gpu)
                        | {"programs": n // READ_ROWS if kernel else None})
        del a
    return rows


def timed_row(problem: str, label: str, fn, operands, kernel: str, moved: int, error: float, on_gpu: bool) -> dict:
    """A kernel's row: µs with its operands left in L2 by the last call (us) and read from HBM (us_cold, what
    a step sees: the S1 q,k,v adapter rows, 44 MB, fit the H200's 50 MB L2)."""
    def us(flush: bool) -> float:  # the kernels named kernel... (Pallas keeps the name it is given)
        found = [t for name, t in device_us(fn, *operands, flush_l2=flush).items() if name.startswith(kernel)]
        return sum(found) if found else float("nan")
    us, cold = (us(False), us(True)) if on_gpu else (float("nan"), float("nan"))
    row = {"problem": problem, "probe": label, "programs": None, "bytes": moved, "us": us, "us_cold": cold,
           "tb_s": moved / us / 1e6 if on_gpu else float("nan"),
           "tb_s_cold": moved / cold / 1e6 if on_gpu else float("nan"), "rel_err": error}
    print(row, flush=True)
    return row


def tile_sums(v, tile_rows, tile_rank, split_rows: bool) -> np.ndarray:
    """A shrink's output [splits, tiles * 16, T * R] -> each live tile's first row [tiles, T * R], the
    splits added up where they were written: an unsplit one-row tile holds its sum in split 0 and leaves
    the others as memory was (on the GPU, anything); NaN for targets a tile does not have."""
    tiles, num_targets = tile_rank.shape
    first = v[:, ::TILE]                                           # [splits, tiles, T * R]
    one_row = (tile_rows[:, 1] == tile_rows[:, 0]) & (not split_rows)
    sums = np.where(one_row[:, None], first[0], first.sum(axis=0))
    has_target = np.repeat(tile_rank > 0, v.shape[2] // num_targets, axis=1)
    return np.where(has_target, sums, np.nan)


def time_variants(problem: str, what: str, variants: dict, make, operands, kernel: str, moved: int,
                  on_gpu: bool) -> list[dict]:
    """Each variant's jitted call (make(options)) on operands, its updated ys checked against the first
    variant's (NumPy), timed on the GPU: the kernels named kernel... of a call."""
    rows, reference = [], None
    for label, options in variants.items():
        fn = make(options)
        out = np.concatenate([np.asarray(y, np.float64) for y in fn(*operands)], axis=1)
        reference = out if reference is None else reference
        error = float(np.abs(out - reference).max() / np.abs(reference).max())
        assert error < 1e-2, f"{problem} {label}: off the engine's {what} by {error:.2e}"
        rows.append(timed_row(problem, label, fn, operands, kernel, moved, error, on_gpu))
    return rows


def time_groups(problem: str, p, a, tile_rank, hidden: int, on_gpu: bool) -> list[dict]:
    """GROUPS: every lora_ kernel of a call; the bytes are A's rows and B's."""
    operands = (a["x"], a["ys"], a["pool"], a["layer"], a["tile_rank"], a["a_pages"], a["b_pages"], a["tile_rows"])
    return time_variants(problem, "group", GROUPS, lambda options: jax.jit(lambda *ops: lora_apply_group(
        *ops, num_pages=p["num_pages"], tokens_per_tile=16, interpret=not on_gpu, **lora_tiling(16) | options)),
        operands, "lora_", 2 * bytes_read("pages_masked", tile_rank, hidden, 2), on_gpu)


def time_expands(problem: str, p, a, v, tile_rank, hidden: int, on_gpu: bool) -> list[dict]:
    """EXPANDS on the shrink's v; the bytes are B's rows (as many as A's at S1's shapes)."""
    tiling = {EXPAND_OPTIONS[k]: value for k, value in lora_tiling(16).items() if k in EXPAND_OPTIONS}
    operands = (v, a["ys"], a["pool"], a["layer"], a["tile_rank"], a["b_pages"], a["tile_rows"])
    return time_variants(problem, "expand", EXPANDS, lambda options: jax.jit(lambda *ops: lora_expand(
        *ops, num_pages=p["num_pages"], tokens_per_tile=16, interpret=not on_gpu, **tiling | options)),
        operands, "lora_expand", bytes_read("pages_masked", tile_rank, hidden, 2), on_gpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="s1_qkv,s1_o")
    ap.add_argument("--quick", action="store_true", help="tiny problems in interpret mode, each probe checked")
    ap.add_argument("--probes", default="probes,gathers,shrinks,expands,groups,sizes",
                    help="which sets to run: PROBES, GATHERS, SHRINKS, EXPANDS (the expands take the shrink's v), "
                         "GROUPS, SIZES_MB (contiguous reads)")
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    hidden = 4096 if not args.quick else 1024
    problems = {n: PROBLEMS[n] if not args.quick else (24, 18, [8], PROBLEMS[n][3], 16)
                for n in args.problems.split(",")}
    roof = rooflines() if on_gpu else {"hbm_bytes_per_s": 1e11}
    rng = np.random.default_rng(0)
    rows = []
    for problem, shape in problems.items():
        p, layouts, _ = build(rng, hidden, *shape)
        a = layouts["gathered"]
        a_pages = jnp.concatenate(a["a_pages"], axis=2)
        layer_base = int(p["layer"]) * p["num_pages"]
        tile_rank = np.asarray(a["tile_rank"])
        for name in PROBES if "probes" in args.probes else ():
            fn = jax.jit(functools.partial(probe, name, layer_base=layer_base, interpret=not on_gpu))
            operands = (a["tile_rank"], a_pages, a["tile_rows"], a["x"], a["pool"])
            got = np.asarray(fn(*operands), np.float64)
            want = expected(name, tile_rank, np.asarray(a_pages), np.asarray(a["tile_rows"]), a["x"], a["pool"],
                            layer_base)
            live = ~np.isnan(want[:, 0])
            error = float(np.abs(got[live] - want[live]).max() / np.abs(want[live]).max())
            assert error < 1e-2, f"{problem} {name}: off by {error:.2e}"
            rows.append(timed_row(problem, name, fn, operands, "probe_", bytes_read(name, tile_rank, hidden, 2),
                                  error, on_gpu) | {"programs": int(got.shape[0])})
        for name in GATHERS if "gathers" in args.probes else ():
            fn = jax.jit(functools.partial(gather, name, layer_base=layer_base, interpret=not on_gpu))
            operands = (a["tile_rank"], a_pages, a["pool"])
            got = np.asarray(fn(*operands), np.float64)
            want = gather_expected(name, tile_rank, np.asarray(a_pages), a["pool"], layer_base)
            error = float(np.abs(got - want).max() / np.abs(want).max())
            assert error < 1e-2, f"{problem} {name}: off by {error:.2e}"
            per_program = GATHERS[name][0]
            moved = int(np.minimum(tile_rank[: len(tile_rank) // per_program * per_program], LIVE).sum()) * hidden * 2
            rows.append(timed_row(problem, name, fn, operands, "probe_", moved, error, on_gpu)
                        | {"programs": int(got.shape[0])})
        tiling = {k: v for k, v in lora_tiling(16).items()
                  if k in ("k_splits", "k_block", "one_row_dot", "one_row_fma", "one_row_k_block", "stages",
                           "mask_rank", "early_pages")}
        operands = (a["x"], a["pool"], a["layer"], a["tile_rank"], a_pages, a["tile_rows"])
        reference = v_engine = None
        for label, options in SHRINKS.items() if {"shrinks", "expands"} & set(args.probes.split(",")) else ():
            shrink = jax.jit(lambda *ops, options=options: lora_shrink(
                *ops, num_pages=p["num_pages"], tokens_per_tile=16, interpret=not on_gpu, **tiling | options))
            v_engine = shrink(*operands) if v_engine is None else v_engine
            v = tile_sums(np.asarray(shrink(*operands), np.float64), np.asarray(a["tile_rows"]), tile_rank,
                          (tiling | options).get("split_rows", False))
            reference = v if reference is None else reference
            written = ~np.isnan(reference)
            error = float(np.abs(v[written] - reference[written]).max() / np.abs(reference[written]).max())
            assert error < 1e-2, f"{problem} {label}: off the engine's shrink by {error:.2e}"
            moved = bytes_read("pages_masked", tile_rank, hidden, 2)
            rows.append(timed_row(problem, label, shrink, operands, "lora_shrink", moved, error, on_gpu))
        if "groups" in args.probes:
            rows += time_groups(problem, p, a, tile_rank, hidden, on_gpu)
        if "expands" in args.probes:
            rows += time_expands(problem, p, a, v_engine, tile_rank, hidden, on_gpu)
    if "sizes" in args.probes:
        rows += size_rows(hidden, on_gpu, rng)
    path = write_json("gather_probe.json", {"env": environment(), "roofline": roof, "hidden": hidden,
                                            "k_block": K_BLOCK, "rows": rows})
    copy = roof["hbm_bytes_per_s"] / 1e12
    print(f"\nwrote {path}; copy rate {copy:.2f} TB/s")
    print(f"{'problem':>8} {'probe':>18} {'programs':>8} {'MB':>7} {'us':>7} {'TB/s':>6} {'of copy':>7} "
          f"{'us HBM':>7} {'of copy':>7}")
    for r in rows:
        cold = (f"{r['us_cold']:7.1f} {r['tb_s_cold'] / copy:7.0%}" if "us_cold" in r else "")
        print(f"{r['problem']:>8} {r['probe']:>18} {r['programs'] or '':>8} {r['bytes'] / 1e6:7.1f} {r['us']:7.1f} "
              f"{r['tb_s']:6.2f} {r['tb_s'] / copy:7.0%} {cold}")


if __name__ == "__main__":
    main()
