"""Random problem instances for the kernels, shared by tests/kernels and benchmarks/kernels.py.

Pools are filled with random data everywhere but the null page, and adapters and KV land on pages
scattered at random, so a kernel that reads a wrong page gets a wrong answer.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.lora import tiles_by_adapter
from pallas_kernels.pool import NULL_PAGE, PoolLayout, lora_page_table


def _random_pool(rng, layout: PoolLayout) -> np.ndarray:
    pool = rng.standard_normal(layout.shape, dtype=np.float32)
    pool.reshape(layout.num_layers, layout.num_pages, -1)[:, NULL_PAGE] = 0.0
    return pool


def lora_problem(rng, *, num_layers: int, page_width: int, in_features: int, out_features: int,
                 adapter_ranks: list[int], tile_adapters: list[int | None], tokens_per_tile: int = 1,
                 max_rank: int | None = None, spare_pages: int = 7, layout_pages: int | None = None) -> dict:
    """One LoRA target over a pool. tile_adapters[i]: adapter of tile i (None = base model).

    Returns numpy arrays: kernel inputs (x, y, pool, layer, tile_rank, a_pages, b_pages, num_pages) and,
    for the oracle, dense A [n, in, R], B [n, R, out] of the chosen layer and per-row adapter ids."""
    max_rank = max_rank or max(16, -(-max(adapter_ranks) // 16) * 16)
    probe = PoolLayout(num_layers, 1, page_width)
    per_adapter = [probe.adapter_pages({"t": (in_features, out_features)}, {"t": r}) for r in adapter_ranks]
    num_pages = layout_pages or 1 + sum(per_adapter) + spare_pages
    layout = PoolLayout(num_layers, num_pages, page_width)
    pool = _random_pool(rng, layout)
    free = rng.permutation(np.arange(1, num_pages))
    scale_a, scale_b = in_features ** -0.5, max(adapter_ranks) ** -0.5
    layer = int(rng.integers(num_layers))
    dense_a = np.zeros((len(adapter_ranks), in_features, max_rank), np.float32)
    dense_b = np.zeros((len(adapter_ranks), max_rank, out_features), np.float32)
    index, cursor = [], 0
    for i, (r, n) in enumerate(zip(adapter_ranks, per_adapter)):
        pages = free[cursor: cursor + n]
        cursor += n
        a = rng.standard_normal((num_layers, in_features, r), dtype=np.float32) * scale_a
        b = rng.standard_normal((num_layers, r, out_features), dtype=np.float32) * scale_b
        data, idx = layout.pack_adapter({"t": (a, b)}, pages)
        pool.reshape(num_layers, num_pages, -1)[:, pages] = data
        index.append(idx["t"])
        dense_a[i, :, :r], dense_b[i, :r] = a[layer], b[layer]
    tiles = len(tile_adapters)
    tile_rank = np.array([adapter_ranks[a] if a is not None else 0 for a in tile_adapters], np.int32)
    a_pages = lora_page_table([index[a][0] if a is not None else None for a in tile_adapters],
                              max_rank, layout.chunks(in_features))
    b_pages = lora_page_table([index[a][1] if a is not None else None for a in tile_adapters],
                              max_rank, layout.chunks(out_features))
    rows = tiles * tokens_per_tile
    row_ids = np.repeat([a if a is not None else -1 for a in tile_adapters], tokens_per_tile).astype(np.int32)
    return dict(
        x=rng.standard_normal((rows, in_features), dtype=np.float32),
        y=rng.standard_normal((rows, out_features), dtype=np.float32),
        pool=pool, layer=np.int32(layer), tile_rank=tile_rank, a_pages=a_pages, b_pages=b_pages,
        num_pages=num_pages, dense_a=dense_a, dense_b=dense_b, row_ids=row_ids)


def attention_problem(rng, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      context_lens: list[int], max_context: int | None = None, spare_pages: int = 5) -> dict:
    """Sequences whose cached K/V sit on scattered pool pages; tables padded with the null page.

    Returns k_pages, v_pages [S, max_context] page ids, pool, layer, dense k, v [S, max_context, Hkv, D]
    of the chosen layer (zeros past each length) and the layout's num_pages."""
    page_width = num_kv_heads * head_dim
    max_context = max_context or max(context_lens)
    num_pages = 1 + 2 * sum(context_lens) + spare_pages
    layout = PoolLayout(num_layers, num_pages, page_width)
    pool = _random_pool(rng, layout)
    free = rng.permutation(np.arange(1, num_pages))
    layer = int(rng.integers(num_layers))
    layer_rows = pool.reshape(num_layers, num_pages, page_width)[layer]
    k_pages = np.full((len(context_lens), max_context), NULL_PAGE, np.int32)
    v_pages = np.full_like(k_pages, NULL_PAGE)
    dense_k = np.zeros((len(context_lens), max_context, num_kv_heads, head_dim), np.float32)
    dense_v = np.zeros_like(dense_k)
    cursor = 0
    for s, n in enumerate(context_lens):
        k_pages[s, :n] = free[cursor: cursor + n]
        v_pages[s, :n] = free[cursor + n: cursor + 2 * n]
        cursor += 2 * n
        dense_k[s, :n] = layer_rows[k_pages[s, :n]].reshape(n, num_kv_heads, head_dim)
        dense_v[s, :n] = layer_rows[v_pages[s, :n]].reshape(n, num_kv_heads, head_dim)
    return dict(pool=pool, layer=np.int32(layer), k_pages=k_pages, v_pages=v_pages, num_pages=num_pages,
                lens=np.array(context_lens, np.int32), dense_k=dense_k, dense_v=dense_v)


def lora_group_problem(rng, *, num_layers: int, page_width: int, in_features: int, out_features: list[int],
                       adapter_ranks: list[list[int]], tile_adapters: list[int | None], tokens_per_tile: int = 1,
                       max_rank: int = 64, spare_pages: int = 5) -> dict:
    """Targets sharing one input (q, k, v): adapter i has rank adapter_ranks[i][t] on target t (0 = not
    targeted). Returns x, ys, pool, layer, tile_rank [tiles, T], per-target a_pages and b_pages tables,
    num_pages, and the dense oracle: deltas [T] of [rows, out_t] in float64."""
    names = [f"t{t}" for t in range(len(out_features))]
    shapes = {n: (in_features, o) for n, o in zip(names, out_features)}
    probe = PoolLayout(num_layers, 1, page_width)
    ranks = [{n: r for n, r in zip(names, rs) if r} for rs in adapter_ranks]
    per_adapter = [probe.adapter_pages(shapes, r) for r in ranks]
    num_pages = 1 + sum(per_adapter) + spare_pages
    layout = PoolLayout(num_layers, num_pages, page_width)
    pool = _random_pool(rng, layout)
    free = rng.permutation(np.arange(1, num_pages))
    layer = int(rng.integers(num_layers))
    rows = len(tile_adapters) * tokens_per_tile
    x = rng.standard_normal((rows, in_features), dtype=np.float32)
    row_adapter = np.repeat([-1 if a is None else a for a in tile_adapters], tokens_per_tile)
    deltas = [np.zeros((rows, o)) for o in out_features]
    index, cursor = [], 0
    for i, (r, n) in enumerate(zip(ranks, per_adapter)):
        pages = free[cursor: cursor + n]
        cursor += n
        weights = {t: (rng.standard_normal((num_layers, in_features, rt), dtype=np.float32) * in_features ** -0.5,
                       rng.standard_normal((num_layers, rt, shapes[t][1]), dtype=np.float32) * rt ** -0.5)
                   for t, rt in r.items()}
        data, idx = layout.pack_adapter(weights, pages)
        pool.reshape(num_layers, num_pages, -1)[:, pages] = data
        index.append(idx)
        mine = row_adapter == i
        for t, name in enumerate(names):
            if name in weights:
                a, b = weights[name]
                deltas[t][mine] = x[mine].astype(np.float64) @ a[layer] @ b[layer]
    tile_rank = np.array([[0 if a is None else ranks[a].get(n, 0) for n in names] for a in tile_adapters], np.int32)

    def table(name, side, width):
        return lora_page_table([None if a is None or name not in index[a] else index[a][name][side]
                                for a in tile_adapters], max_rank, layout.chunks(width))

    return dict(x=x, ys=[rng.standard_normal((rows, o), dtype=np.float32) for o in out_features], pool=pool,
                layer=np.int32(layer), tile_rank=tile_rank, num_pages=num_pages, deltas=deltas, row_ids=row_adapter,
                a_pages=[table(n, 0, in_features) for n in names],
                b_pages=[table(n, 1, o) for n, o in zip(names, out_features)])


def gathered_tiles(p: dict, num_tiles: int, tokens_per_tile: int = 16):
    """A one-row-per-tile lora_problem (or lora_group_problem) regrouped into gathered tiles of rows sharing
    an adapter (the decode layout). -> (tile_rows, tile_rank, a_pages, b_pages) as numpy arrays (for a group:
    tile_rank [tiles, T] and lists of T tables)."""
    tile_rows, tile_adapter = tiles_by_adapter(p["row_ids"], num_tiles, tokens_per_tile)
    first = tile_rows[:, 0]
    live = (tile_adapter >= 0).reshape((-1,) + (1,) * (p["tile_rank"].ndim - 1))
    rank = np.where(live, p["tile_rank"][first], 0).astype(np.int32)
    if isinstance(p["a_pages"], list):
        return tile_rows, rank, [t[first] for t in p["a_pages"]], [t[first] for t in p["b_pages"]]
    return tile_rows, rank, p["a_pages"][first], p["b_pages"][first]
