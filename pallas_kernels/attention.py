"""Paged attention over the unified pool: the decode kernel, the pieces the prefill kernel shares
(pallas_kernels.attention_prefill) and the plain-jnp reference both are checked against (the K/V write:
pallas_kernels.kv_write).

A sequence's cache is two page tables, k_pages and v_pages [seqs, max_context] (page ids, the null page
past its length); token j's key in layer l is pool row l * num_pages + k_pages[s, j], all kv heads side
by side (the page width is Hkv * D). Online softmax in float32 (flash-attention style).

kv_fp8: the rows hold FP8 keys and values packed into pool words (pallas_kernels.kv_fp8). The kernels then
work on a head's `phases` (elements p, p + phases, ...) from the load of q to the store of the output: the
scores are a sum of per-phase dots and the weighted sum is kept per phase. phases = 1 is the plain pool.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import decode_tiling
from pallas_kernels.kv_fp8 import compute_dtype, phases_of, unpack_rows, value_offset
from pallas_kernels.kv_fp8 import unpack as unpack_fp8
from pallas_kernels.triton_compat import (
    atomic_add,
    cdiv,
    contract_last,
    contract_middle,
    debug_barrier,
    div,
    load,
    pallas_call,
    resolve_interpret,
    store,
    store_rows,
)

_NEG = -1e30  # finite: exp(_NEG - _NEG) must not be NaN for fully masked blocks


def _zero_rows(v, valid):
    """Rows of v past the sequence as exact zeros: a page can hold anything there (a stale NaN of another
    tenant's request), and a zero probability times NaN is still NaN."""
    return jnp.where(valid[:, None], v, jnp.zeros_like(v))


def _online_softmax_step(carry, scores, vs):
    """One block's keys into (m, l, acc phases); vs: the block's values, a phase each."""
    m, l, accs = carry
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    p = jnp.exp(scores - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    return (m_new, l * alpha + jnp.sum(p, axis=-1),
            tuple(acc * alpha[:, None] + contract_middle(p.astype(v.dtype), v) for acc, v in zip(accs, vs)))


def _hardware_fp8(fp8_unpack: str, interpret: bool) -> bool:
    """Whether FP8 words convert by the GPU's instruction (kv_fp8.unpack): on the GPU unless asked otherwise."""
    if fp8_unpack not in ("hardware", "bits"):
        raise ValueError(f"fp8_unpack must be 'hardware' or 'bits', not {fp8_unpack!r}")
    return fp8_unpack == "hardware" and not interpret


def _split_phases(x, phases: int) -> list:
    """[n, D] -> its phases [n, D / phases] (elements p, p + phases, ...), by halving the last axis in
    registers (Triton's split), so rows are loaded whole: wide loads, not a strided gather."""
    if phases == 1:
        return [x]
    even, odd = jax.lax.unstack(x.reshape(x.shape[0], x.shape[1] // 2, 2), axis=2)
    return [y for pair in zip(_split_phases(even, phases // 2), _split_phases(odd, phases // 2)) for y in pair]


def _join_phases(values: list):
    """_split_phases' inverse: phases [n, D / phases] -> [n, D] (Triton's join)."""
    if len(values) == 1:
        return values[0]
    even, odd = _join_phases(values[0::2]), _join_phases(values[1::2])
    return jax.lax.stack([even, odd], axis=2).reshape(even.shape[0], 2 * even.shape[1])


def _load_q(q_ref, rows, head_dim: int, phases: int, scale: float, dtype) -> list:
    """Query rows (an index array [n] or a pl.ds) as their phases [n, D / phases], scaled by 1/sqrt(D) in
    `dtype` (q's, or an FP8 cache's compute_dtype: float16, q clipped to its range)."""
    return _scaled_q(q_ref[rows, pl.ds(0, head_dim)], phases, scale, dtype)


def _load_packed_q(q_ref, rows, heads: int, group: int, head_dim: int) -> jax.Array:
    """The query tile of `heads` adjacent KV heads packed block-diagonally: [n, heads * D], tile row t (query
    row rows[t], of the tile's KV head t // group) holds its q in that head's D columns and zeros elsewhere,
    so one dot against the heads' keys side by side gives every row its own head's scores."""
    cols = jnp.arange(heads * head_dim)
    own = div(cols, head_dim)[None, :] == div(jnp.arange(rows.shape[0]), group)[:, None]
    return load(q_ref.at[rows[:, None], jax.lax.rem(cols, jnp.int32(head_dim))[None, :]], mask=own, other=0)


def _unpack_heads(acc, heads: int, group: int):
    """A packed tile's [n, heads * W] -> [n, W]: row t's own head's columns (W = D / phases)."""
    n, width = acc.shape[0], acc.shape[1] // heads
    own = jnp.arange(heads)[None, :] == div(jnp.arange(n), group)[:, None]
    return jnp.sum(jnp.where(own[:, :, None], acc.reshape(n, heads, width), 0.0), axis=1)


def _scaled_q(q, phases: int, scale: float, dtype) -> list:
    """Query rows [n, D] as their phases, scaled and cast (_load_q)."""
    scaled = [x.astype(jnp.float32) * scale for x in _split_phases(q, phases)]
    if jnp.dtype(dtype) != jnp.dtype(q.dtype):  # float16: a hostile row's huge q stays finite in its own row
        limit = float(jnp.finfo(dtype).max)
        scaled = [jnp.clip(q, -limit, limit) for q in scaled]
    return [q.astype(dtype) for q in scaled]


def _load_kv(pool_ref, rows, kv_head: int | jax.Array, head_dim: int, phases: int, dtype, values: bool,
             hardware: bool, valid=None) -> list:
    """A KV head's rows [n] of keys (values: of values) as phases [n, D / phases] in dtype (hardware: FP8
    words converted by the GPU's instruction, kv_fp8.unpack). valid [n]: rows past it read as zeros and touch
    no memory (else padding keys read the null page's row; see decode_tiling.MASK_PADDING)."""
    words = head_dim // phases
    # an FP8 page holds a token's key and then its value; a plain one, one of them
    start = (value_offset(pool_ref.shape[1], phases) if values and phases > 1 else 0) + kv_head * words
    if valid is None:
        raw = pool_ref[rows, pl.ds(start, words)]
    else:
        raw = load(pool_ref.at[rows[:, None], (start + jnp.arange(words))[None, :]],
                   mask=jnp.broadcast_to(valid[:, None], (rows.shape[0], words)), other=0)
    return [raw] if phases == 1 else unpack_fp8(raw, dtype, hardware=hardware)


def _scores(qs, ks):
    """q . k over phases [q_rows, keys] in float32."""
    total = contract_last(qs[0], ks[0].astype(qs[0].dtype))
    for q, k in zip(qs[1:], ks[1:]):
        total += contract_last(q, k.astype(q.dtype))
    return total


def _store_phases(ref, rows, values, head_dim: int, keep):
    """ref[rows] = the phases' values [n, D / phases] interleaved back into rows of D, where keep [n]."""
    value = _join_phases(values).astype(ref.dtype)
    store_rows(ref, rows, jnp.arange(head_dim), value, mask=jnp.broadcast_to(keep[:, None], value.shape))


def _decode_kernel(layer_ref, lens_ref, kp_ref, vp_ref, q_ref, pool_ref, *out_refs, group, q_rows, head_dim,
                   block_k, heads_per_program, splits, min_split_blocks, combine, num_pages, max_context, num_heads,
                   scale, phases, hardware_fp8, prefetch_pages, mask_padding, pack_heads, interpret):
    """One program: sequence `seq`, `heads_per_program` adjacent KV heads (their columns sit side by side
    in a page row), the key blocks of context split `split`. Each KV head's query heads are one tile of
    q_rows >= 16 rows for tensor-core dots (MHA and GQA alike; padded with neighbours' rows, never stored), or
    with pack_heads all the program's heads share one tile, block-diagonal over their columns side by side. A
    CUDA-core form with the group's own rows alone (no padding) was 2-3x slower on an H200 (twenty-eighth
    session) and is gone. out_refs:
    the output (one split); the splits' partials (combine "xla"); or the counters' input, the output, the
    partials and the counters (combine "kernel")."""
    seq, head_block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    base = layer_ref[0] * num_pages
    length = lens_ref[seq]
    num_blocks = cdiv(length, block_k)
    # each sequence splits its own length, into splits of at least min_split_blocks blocks: a short context in
    # a wide table (160 keys of 2,048) then fills one split, not a few one-block ones and a merge
    per_split = jnp.maximum(cdiv(num_blocks, splits), max(min_split_blocks, 1))
    first = split * per_split
    last = jnp.minimum(first + per_split, num_blocks)
    total_rows = lens_ref.shape[0] * num_heads
    tile_rows = jnp.arange(q_rows)
    dtype = compute_dtype(pool_ref.dtype, q_ref.dtype) if phases > 1 else q_ref.dtype
    # tiles: (column block, its width, first query row, real rows)
    if pack_heads:  # one tile for all the program's KV heads
        first_row = seq * num_heads + head_block * heads_per_program * group
        tiles = [(head_block, heads_per_program * head_dim, first_row, heads_per_program * group)]
        qs = [_scaled_q(_load_packed_q(q_ref, jnp.minimum(first_row + tile_rows, total_rows - 1),
                                       heads_per_program, group, head_dim), phases, scale, dtype)]
    else:
        heads = [head_block * heads_per_program + h for h in range(heads_per_program)]
        tiles = [(h, head_dim, seq * num_heads + h * group, group) for h in heads]
        # [q_rows, D / phases] each, a list per KV head
        qs = [_load_q(q_ref, jnp.minimum(r + tile_rows, total_rows - 1), head_dim, phases, scale, dtype)
              for _, _, r, _ in tiles]

    def page_rows(i):
        """Block i's pool rows of keys and values (past the sequence: the null page)."""
        valid = i * block_k + jnp.arange(block_k) < length
        return tuple(base + load(ref.at[pl.ds(seq * max_context + i * block_k, block_k)], mask=valid, other=0)
                     for ref in (kp_ref, vp_ref))

    def body(i, carry):
        valid = i * block_k + jnp.arange(block_k) < length
        if prefetch_pages:
            # the next block's page ids are read here and used one step later, so a step's gathers never
            # wait on its own table read (ncu: long-scoreboard stalls led, twenty-eighth session)
            states, (k_rows, v_rows) = carry
            next_rows = page_rows(i + 1)
        else:
            states, (k_rows, v_rows), next_rows = carry, page_rows(i), None
        gather_mask = valid if mask_padding else None
        out = []
        for q, (column_block, width, _, _), state in zip(qs, tiles, states):
            # [block_k, width / phases] each
            k = _load_kv(pool_ref, k_rows, column_block, width, phases, dtype, False, hardware_fp8, gather_mask)
            v = _load_kv(pool_ref, v_rows, column_block, width, phases, dtype, True, hardware_fp8, gather_mask)
            scores = jnp.where(valid[None, :], _scores(q, k), _NEG)
            # masked gathers already read zeros past the length (128 selects a thread a step saved)
            out.append(_online_softmax_step(state, scores, v if mask_padding else [_zero_rows(x, valid) for x in v]))
        return (tuple(out), next_rows) if prefetch_pages else tuple(out)

    init = tuple((jnp.full((q_rows,), _NEG, jnp.float32), jnp.zeros((q_rows,), jnp.float32),
                  tuple(jnp.zeros((q_rows, width // phases), jnp.float32) for _ in range(phases)))
                 for _, width, _, _ in tiles)
    if prefetch_pages:
        final, _ = jax.lax.fori_loop(first, last, body, (init, page_rows(first)))
    else:
        final = jax.lax.fori_loop(first, last, body, init)
    rows_keep = [(r + tile_rows, (tile_rows < real) & (r + tile_rows < total_rows)) for _, _, r, real in tiles]
    if pack_heads:  # every row keeps its own head's columns
        final = [(m, l, tuple(_unpack_heads(acc, heads_per_program, group) for acc in accs)) for m, l, accs in final]

    def store_output(o_ref, only=True):
        for (rows, keep), (_, l, accs) in zip(rows_keep, final):
            _store_phases(o_ref, rows, [acc / jnp.maximum(l, 1e-30)[:, None] for acc in accs], head_dim, keep & only)

    if splits == 1:
        store_output(out_refs[0])
        return
    # this split's partial softmax, combined after (flash-decoding)
    o_ref, acc_ref, m_ref, l_ref, count_ref = out_refs[1:] if combine == "kernel" else (None, *out_refs, None)
    # the splits that hold keys (a short context in a wide table fills few): XLA's merge reads every split, so
    # the empty ones store their (empty) partials; the in-kernel merge reads only these, and they alone store
    live = cdiv(num_blocks, per_split)
    stores = True
    if combine == "kernel":
        # one split holds every key (or none: an idle row): it writes the output itself, as an unsplit pass
        whole = live <= 1
        store_output(o_ref, whole & (split == 0))
        stores = (split < live) & jnp.logical_not(whole)
    for (rows, keep), (m, l, accs) in zip(rows_keep, final):
        keep = keep & stores
        _store_phases(acc_ref, split * total_rows + rows, accs, head_dim, keep)
        store(m_ref.at[split * total_rows + rows], m, mask=keep)
        store(l_ref.at[split * total_rows + rows], l, mask=keep)
    if combine == "kernel":
        # The last of a (sequence, KV heads)'s splits that hold keys to finish combines them, in this launch:
        # the barrier puts every thread's partial stores before the counter's release (acq_rel), which the
        # last program's increment acquires before it reads them back. Splits without keys take no part
        # (no fence, no atomic), nor does a row whose keys one split holds.
        @pl.when(stores)
        def _():
            debug_barrier(interpret)
            finished = atomic_add(count_ref, seq * pl.num_programs(1) + head_block, jnp.int32(1))

            @pl.when(finished == live - 1)
            def _():
                for rows, keep in rows_keep:
                    _combine_splits(o_ref, acc_ref, m_ref, l_ref, rows, keep, splits, live, total_rows)
                # every other split has counted: the counter is free to leave at zero, so the call hands its
                # counters back zeroed and the next call needs no zeroing pass of its own
                store(count_ref.at[seq * pl.num_programs(1) + head_block], jnp.int32(0))


def _combine_splits(o_ref, acc_ref, m_ref, l_ref, rows, keep, splits: int, live, total_rows):
    """o[rows] from the first `live` splits' partial softmaxes (m, l, acc) of those rows, merged online over
    the splits; the rest hold no keys and are not read (their loads masked: a context of 160 keys in a
    table of 2,048 fills 3 of 32 splits). Unrolled: the loads are independent, so they can all be in flight
    at once (they come from L2, where the splits just wrote them). Plain loads: after the counter's acquire
    they see the other programs' stores (volatile loads may not be reordered, so they would be issued one
    after another)."""
    read = jnp.minimum(rows, total_rows - 1)  # masked rows touch no memory; clamped for interpret mode
    cols = jnp.arange(acc_ref.shape[1])
    m_run = jnp.full(rows.shape, _NEG, jnp.float32)
    l_run = jnp.zeros(rows.shape, jnp.float32)
    acc_run = jnp.zeros((rows.shape[0], cols.shape[0]), jnp.float32)
    for split in range(splits):
        part = split * total_rows + read
        filled = keep & (split < live)  # an unread split weighs nothing: m = _NEG, l = 0, acc = 0
        m = load(m_ref.at[part], mask=filled, other=_NEG)
        l = load(l_ref.at[part], mask=filled, other=0.0)
        acc = load(acc_ref.at[part[:, None], cols[None, :]],
                   mask=jnp.broadcast_to(filled[:, None], (rows.shape[0], cols.shape[0])), other=0.0)
        m_new = jnp.maximum(m_run, m)
        old, new = jnp.exp(m_run - m_new), jnp.exp(m - m_new)
        m_run, l_run = m_new, l_run * old + l * new
        acc_run = acc_run * old[:, None] + acc * new[:, None]
    value = (acc_run / jnp.maximum(l_run, 1e-30)[:, None]).astype(o_ref.dtype)
    store_rows(o_ref, rows, cols, value, mask=jnp.broadcast_to(keep[:, None], value.shape))


def paged_decode_attention(q, pool, layer, lens, k_pages, v_pages, *, num_pages: int, **options):
    """One query token per sequence: see paged_decode_attention_counted, whose counters this call makes (a zeroing
    pass before the kernel where it merges split contexts itself) and drops."""
    out, _ = paged_decode_attention_counted(q, pool, layer, lens, k_pages, v_pages, None, num_pages=num_pages,
                                            **options)
    return out


def decode_counters(seqs: int, num_kv_heads: int) -> jax.Array:
    """Zeroed counters for paged_decode_attention_counted: one per (sequence, KV head), enough for any tiling."""
    return jnp.zeros((seqs * num_kv_heads,), jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_pages", "block_k", "heads_per_program", "splits", "min_split_keys",
                                             "num_warps", "num_stages", "combine", "kv_fp8",
                                             "fp8_unpack", "prefetch_pages", "mask_padding", "pack_heads",
                                             "interpret"))
def paged_decode_attention_counted(q, pool, layer, lens, k_pages, v_pages, counters, *, num_pages: int,
                                   block_k: int | None = None, heads_per_program: int | None = None,
                                   splits: int | None = None, min_split_keys: int | None = None,
                                   num_warps: int | None = None, num_stages: int | None = None,
                                   combine: str | None = None, kv_fp8: bool = False, fp8_unpack: str = "hardware",
                                   prefetch_pages: bool | None = None, mask_padding: bool | None = None,
                                   pack_heads: bool | None = None, interpret: bool | None = None):
    """One query token per sequence. q [S, Hq, D]; lens [S] (keys 0..lens-1, the new one included, >= 1);
    k_pages, v_pages [S, max_context] per-token page ids. -> ([S, Hq, D], counters). Tiling from
    decode_tiling.decode_launch_params unless given. With the context split, combine says where the splits' partial
    softmaxes are merged: "xla" (a second pass after the kernel) or "kernel" (by the last split of each sequence and
    KV heads to finish, in the same launch, counted in `counters`: decode_counters' zeros, or the counters an
    earlier call returned, which it leaves zeroed, so calls in a row (a step's layers) pass them on and zero them
    once; None: zeros made here, a pass of their own). A split holds at least min_split_keys keys (rounded up to
    whole blocks), so a sequence shorter than the table fills fewer splits; with the in-kernel merge, a sequence
    that fills one split writes its output directly. kv_fp8: the pages hold FP8 keys and values
    (pallas_kernels.kv_fp8), their dots in float16 (kv_fp8.compute_dtype); fp8_unpack "hardware" converts a word's
    two FP8 values in one instruction on the GPU, "bits" by shifts and masks (as interpret mode always does; kept to
    measure the difference). prefetch_pages: each step reads the next block's page ids, so its own gathers do not
    wait on a table read (default: decode_launch_params'). mask_padding: keys past a sequence's length are not read
    (default decode_tiling.MASK_PADDING). pack_heads: a program's KV heads share one query tile (default:
    decode_launch_params', PACK_HEADS)."""
    seqs, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[1] // head_dim
    group = num_heads // num_kv_heads
    max_context = k_pages.shape[1]
    tiling = decode_tiling.decode_launch_params(seqs, num_kv_heads, group, max_context, kv_fp8=kv_fp8)
    block_k = block_k or tiling["block_k"]
    heads_per_program = heads_per_program or tiling["heads_per_program"]
    splits = splits or tiling["splits"]
    min_split_keys = tiling["min_split_keys"] if min_split_keys is None else min_split_keys
    num_warps = num_warps or tiling["num_warps"]
    combine = combine or tiling["combine"]
    prefetch_pages = tiling["prefetch_pages"] if prefetch_pages is None else prefetch_pages
    num_stages = num_stages or tiling["num_stages"]
    mask_padding = decode_tiling.MASK_PADDING if mask_padding is None else mask_padding
    pack_heads = tiling["pack_heads"] if pack_heads is None else pack_heads
    if combine not in ("xla", "kernel"):
        raise ValueError(f"combine must be 'xla' or 'kernel', not {combine!r}")
    q_rows = max(16, 1 << (group * (heads_per_program if pack_heads else 1) - 1).bit_length())
    rows = seqs * num_heads
    head_blocks = num_kv_heads // heads_per_program
    interpret = resolve_interpret(interpret)
    kernel = functools.partial(
        _decode_kernel, group=group, q_rows=q_rows, head_dim=head_dim, block_k=block_k,
        heads_per_program=heads_per_program, splits=splits, min_split_blocks=-(-min_split_keys // block_k),
        combine=combine, num_pages=num_pages,
        max_context=max_context, num_heads=num_heads, scale=head_dim ** -0.5,
        phases=phases_of(pool.dtype) if kv_fp8 else 1, hardware_fp8=_hardware_fp8(fp8_unpack, interpret),
        prefetch_pages=prefetch_pages, mask_padding=mask_padding, pack_heads=pack_heads, interpret=interpret)
    operands = [jnp.reshape(layer, (1,)).astype(jnp.int32), lens, k_pages.reshape(-1), v_pages.reshape(-1),
                q.reshape(rows, head_dim), pool]
    out_shape = [jax.ShapeDtypeStruct((rows, head_dim), q.dtype)]
    if splits > 1:
        partials = [jax.ShapeDtypeStruct((splits * rows, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((splits * rows,), jnp.float32),
                    jax.ShapeDtypeStruct((splits * rows,), jnp.float32)]
        out_shape = partials if combine == "xla" else out_shape + partials
    aliases = {}
    merges = splits > 1 and combine == "kernel"
    if merges:
        counters = decode_counters(seqs, head_blocks) if counters is None else counters
        if counters.shape[0] < seqs * head_blocks:
            raise ValueError(f"{counters.shape[0]} counters for {seqs * head_blocks} (sequence, KV heads) pairs")
        aliases = {len(operands): len(out_shape)}
        operands.append(counters)
        out_shape.append(jax.ShapeDtypeStruct(counters.shape, counters.dtype))
    call = pallas_call(kernel, out_shape=tuple(out_shape), grid=(seqs, head_blocks, splits),
                       interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                       input_output_aliases=aliases, name="paged_decode_attention")
    out = call(*operands)
    if merges:
        counters = out[-1]
    if splits > 1 and combine == "xla":
        acc, m, l = (x.reshape(splits, rows, *x.shape[1:]) for x in out)
        weight = jnp.exp(m - jnp.max(m, axis=0))   # [splits, rows]
        total = jnp.sum(weight * l, axis=0)
        out = [(jnp.sum(weight[..., None] * acc, axis=0) / jnp.maximum(total, 1e-30)[:, None]).astype(q.dtype)]
    return out[0].reshape(seqs, num_heads, head_dim), counters


def paged_attention_reference(q, pool, layer, q_pos, seq_of_row, k_pages, v_pages, *, num_pages: int,
                              kv_fp8: bool = False, **_):
    """Plain jnp: gather each row's sequence cache, causal mask key_pos <= q_pos (masked keys and values
    contribute exact zeros, whatever their pages hold). q [N, Hq, D]; kv_fp8 as for the kernels."""
    rows, num_heads, head_dim = q.shape
    width = pool.shape[1]
    num_kv_heads = width // head_dim
    base = layer * num_pages

    def cache(pages, values: bool):
        rows_of = pool[base + pages[seq_of_row]]
        if kv_fp8:
            rows_of = unpack_rows(rows_of[..., value_offset(width, phases_of(pool.dtype)) if values else 0:], width)
        return rows_of.astype(jnp.float32).reshape(rows, -1, num_kv_heads, head_dim)

    k, v = cache(k_pages, False), cache(v_pages, True)
    k, v = jnp.repeat(k, num_heads // num_kv_heads, axis=2), jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    scores = jnp.einsum("nhd,nshd->nhs", q.astype(jnp.float32), k) * head_dim ** -0.5
    mask = jnp.arange(k.shape[1])[None, None, :] <= q_pos[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    v = jnp.where(mask[:, 0, :, None, None], v, 0.0)
    return jnp.einsum("nhs,nshd->nhd", probs, v).astype(q.dtype)
