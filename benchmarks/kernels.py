"""Check and time every kernel on the GPU against its reference and the baselines (issue: kernels).

    PYTHONPATH=. python benchmarks/kernels.py [--quick]      # writes $OUT/kernels.json (or ./kernels.json)

Timing: each kernel runs n and 2n times inside one jitted fori_loop (its output fed back in); the
difference over n removes the ~40 us dispatch of a jitted call. Median of 3. Bandwidth counts the
fewest bytes the work must move (each distinct adapter's A and B once, x once, y read and written).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import rooflines, timed
from jslora.config import ModelConfig
from jslora.model.lora import lora_delta
from pallas_kernels.attention import paged_attention_reference, paged_decode_attention
from pallas_kernels.attention_prefill import paged_prefill_attention
from pallas_kernels.lora import lora_apply, lora_apply_reference
from pallas_kernels.pool import PoolLayout
from pallas_kernels.problems import attention_problem, gathered_tiles, lora_problem

BF16 = jnp.bfloat16


def rel_err(out, ref, base=None):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if base is not None:
        out, ref = out - base, ref - base
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def one_hot_baseline(x, y, a_stack, b_stack, onehot):
    """The JAX peers' LoRA: every token against every adapter, padded to the largest rank, then masked."""
    xa = jnp.einsum("ti,nir->tnr", x, a_stack, preferred_element_type=jnp.float32)
    v = (xa * onehot[:, :, None]).astype(x.dtype)
    return y + jnp.einsum("tnr,nro->to", v, b_stack, preferred_element_type=jnp.float32).astype(y.dtype)


def bench_gathered(p, roof, moved, k_splits=(1, 2, 4)):
    """The engine's decode path: the same rows, grouped by adapter into gathered tiles of 16 (each tile
    reads its adapter once, with tensor-core dots), the shrink's input features split k ways."""
    tile_rows, rank, a_pages, b_pages = gathered_tiles(p, len(p["row_ids"]), 16)
    y, pool = jnp.asarray(p["y"], BF16), jnp.asarray(p["pool"], BF16)
    meta = [jnp.asarray(a) for a in (p["layer"], rank, a_pages, b_pages, tile_rows)]
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=16)
    ref = lora_apply_reference(y, y, pool, *meta, **opts)
    out = {"gathered_tiles": int((rank > 0).sum()), "gathered": []}
    for k in k_splits:
        run = functools.partial(lora_apply, k_splits=k, **opts)
        err = rel_err(run(y, y, pool, *meta), ref, base=np.asarray(y, np.float64))
        t = timed(lambda c, pool, *m: run(c, c, pool, *m), y, pool, *meta)
        out["gathered"].append({"k_splits": k, "us": t * 1e6, "rel_err": err,
                                "bw_share": moved / t / roof["hbm_bytes_per_s"]})
    best = min(out["gathered"], key=lambda r: r["us"])
    out.update(gathered_us=best["us"], gathered_k=best["k_splits"], gathered_bw_share=best["bw_share"],
               gathered_err=max(r["rel_err"] for r in out["gathered"]))
    return out


def bench_mbgmv(rng, roof, batch, distinct, ranks, hidden=4096, baselines=("onehot", "bmm", "take")):
    adapter_ranks = [ranks[i % len(ranks)] for i in range(distinct)]
    tiles = [int(i) for i in rng.permutation(np.arange(batch) % distinct)]
    p = lora_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=hidden,
                     adapter_ranks=adapter_ranks, tile_adapters=tiles, max_rank=max(16, max(ranks)), spare_pages=1)
    x, y, pool = (jnp.asarray(p[k], BF16) for k in ("x", "y", "pool"))
    meta = [jnp.asarray(p[k]) for k in ("layer", "tile_rank", "a_pages", "b_pages")]
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=1)
    out = lora_apply(x, y, pool, *meta, **opts)
    ref = lora_apply_reference(x, y, pool, *meta, **opts)
    err = rel_err(out, ref, base=np.asarray(y, np.float64))
    used = sorted(set(tiles))
    weight_bytes = sum(adapter_ranks[a] * 2 * hidden * 2 for a in used)
    moved = weight_bytes + batch * hidden * 2 * 3
    # x = y = the carry: each call's input is the last call's output, so XLA cannot hoist the shrink
    t_ours = timed(lambda c, pool, *m: lora_apply(c, c, pool, *m, **opts), y, pool, *meta)
    # baselines, all in bf16 over the same adapters
    a_stack, b_stack = jnp.asarray(p["dense_a"], BF16), jnp.asarray(p["dense_b"], BF16)
    ids = jnp.asarray(p["row_ids"])
    onehot = jax.nn.one_hot(ids, distinct, dtype=BF16)
    nan = float("nan")
    t_onehot = (timed(lambda c, a, b, oh: one_hot_baseline(c, c, a, b, oh), y, a_stack, b_stack, onehot)
                if "onehot" in baselines else nan)
    t_bmm = timed(lambda c, pool, *m: lora_apply_reference(c, c, pool, *m, **opts), y, pool, *meta) \
        if "bmm" in baselines else nan
    t_take = timed(lambda c, a, b, i: c + lora_delta(c, a, b, i), y, a_stack, b_stack, ids) \
        if "take" in baselines else nan
    gathered = bench_gathered(p, roof, moved)
    return {"kernel": "mbgmv", "batch": batch, "distinct": distinct, "ranks": ranks, "rel_err": err,
            "us": t_ours * 1e6, "bytes": moved, "bw_share": moved / t_ours / roof["hbm_bytes_per_s"],
            "onehot_us": t_onehot * 1e6, "bmm_us": t_bmm * 1e6, "take_us": t_take * 1e6,
            "speedup_vs_onehot": t_onehot / t_ours, **gathered,
            "gathered_vs_onehot": t_onehot * 1e6 / gathered["gathered_us"]}


def bench_mbgmm(rng, roof, segments, seg_len, ranks, hidden=4096, tile=16):
    adapter_ranks = [ranks[i % len(ranks)] for i in range(segments)]
    tiles = [s for s in range(segments) for _ in range(seg_len // tile)]
    p = lora_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=hidden,
                     adapter_ranks=adapter_ranks, tile_adapters=tiles, tokens_per_tile=tile,
                     max_rank=max(16, max(ranks)), spare_pages=1)
    x, y, pool = (jnp.asarray(p[k], BF16) for k in ("x", "y", "pool"))
    meta = [jnp.asarray(p[k]) for k in ("layer", "tile_rank", "a_pages", "b_pages")]
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=tile)
    err = rel_err(lora_apply(x, y, pool, *meta, **opts), lora_apply_reference(x, y, pool, *meta, **opts),
                  base=np.asarray(y, np.float64))
    t_ours = timed(lambda c, pool, *m: lora_apply(c, c, pool, *m, **opts), y, pool, *meta)
    t_bmm = timed(lambda c, pool, *m: lora_apply_reference(c, c, pool, *m, **opts), y, pool, *meta)
    flops = sum(2 * 2 * hidden * adapter_ranks[s] * seg_len for s in range(segments))
    moved = sum(r * 2 * hidden * 2 for r in adapter_ranks) + segments * seg_len * hidden * 2 * 3
    return {"kernel": "mbgmm", "tokens": segments * seg_len, "segments": segments, "ranks": ranks,
            "rel_err": err, "us": t_ours * 1e6, "tflops": flops / t_ours / 1e12,
            "bw_share": moved / t_ours / roof["hbm_bytes_per_s"], "bmm_us": t_bmm * 1e6}


def bench_decode_attention(rng, roof, batch, context, heads, kv_heads, head_dim=128):
    p = attention_problem(rng, num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                          context_lens=[context] * batch, spare_pages=1)
    pool = jnp.asarray(p["pool"], BF16)
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), BF16)
    meta = [jnp.asarray(p[k]) for k in ("layer", "lens", "k_pages", "v_pages")]
    out = paged_decode_attention(q, pool, *meta, num_pages=p["num_pages"])
    ref = paged_attention_reference(q, pool, p["layer"], jnp.asarray(p["lens"] - 1), jnp.arange(batch),
                                    meta[2], meta[3], num_pages=p["num_pages"])
    err = rel_err(out, ref)
    t = timed(lambda c, pool, *a: paged_decode_attention(c, pool, *a, num_pages=p["num_pages"]), q, pool, *meta)
    t_ref = timed(lambda c, pool, rows, *a: paged_attention_reference(c, pool, a[0], a[1] - 1, rows, a[2], a[3],
                                                                      num_pages=p["num_pages"]),
                  q, pool, jnp.arange(batch), *meta)
    moved = batch * context * kv_heads * head_dim * 2 * 2 + 2 * q.nbytes
    return {"kernel": "decode_attention", "batch": batch, "context": context, "heads": heads,
            "kv_heads": kv_heads, "rel_err": err, "us": t * 1e6, "bw_share": moved / t / roof["hbm_bytes_per_s"],
            "xla_gather_us": t_ref * 1e6}


def bench_prefill_attention(rng, roof, seqs, new, heads, kv_heads, head_dim=128, tile=64):
    p = attention_problem(rng, num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                          context_lens=[new] * seqs, spare_pages=1)
    pool = jnp.asarray(p["pool"], BF16)
    q = jnp.asarray(rng.standard_normal((seqs * new, heads, head_dim)), BF16)
    tile_seq = jnp.asarray(np.repeat(np.arange(seqs), new // tile), jnp.int32)
    tile_pos = jnp.asarray(np.tile(np.arange(0, new, tile), seqs), jnp.int32)
    meta = [jnp.asarray(p["layer"]), tile_seq, tile_pos, jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]),
            jnp.asarray(p["v_pages"])]
    opts = dict(num_pages=p["num_pages"], tile=tile, block=64)
    out = paged_prefill_attention(q, pool, *meta, **opts)
    last = new  # the dense reference of every row needs 16 GiB: check the last sequence's rows
    ref = paged_attention_reference(q[-last:], pool, p["layer"], jnp.arange(new), jnp.full((new,), seqs - 1),
                                    meta[4], meta[5], num_pages=p["num_pages"])
    err = rel_err(out[-last:], ref)
    t = timed(lambda c, pool, *a: paged_prefill_attention(c, pool, *a, **opts), q, pool, *meta)
    flops = seqs * heads * head_dim * 2 * 2 * new * new / 2
    return {"kernel": "prefill_attention", "seqs": seqs, "new_tokens": new, "heads": heads, "kv_heads": kv_heads,
            "rel_err": err, "us": t * 1e6, "tflops": flops / t / 1e12}


def padding_report() -> list[dict]:
    rows = []
    for name in ("llama-7b", "llama-3-8b"):
        cfg = ModelConfig.named(name)
        layout = PoolLayout(cfg.num_layers, 1, cfg.kv_width)
        shapes = {t: cfg.module_shape(t) for t in ("q", "k", "v", "o", "gate", "up", "down")}
        for targets in (("q", "k", "v", "o"), tuple(shapes)):
            ranks = {t: 16 for t in targets}
            rows.append({"model": name, "targets": ",".join(targets), "page_width": cfg.kv_width,
                         "pages_per_rank": layout.adapter_pages(shapes, ranks) // 16,
                         "padding_share": layout.padding_share(shapes, ranks)})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--sections", default="mbgmv,mbgmm,decode,prefill")
    parser.add_argument("--ranks", default="8;8,16,32,64", help="MBGMV rank sets, ';'-separated")
    parser.add_argument("--batches", default="1,32,256,512")
    parser.add_argument("--baselines", default="onehot,bmm,take", help="MBGMV baselines to time")
    parser.add_argument("--budget", type=float, default=480, help="seconds; later shapes are skipped past it")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "padding": padding_report()}
    roof = results["roofline"] = rooflines()
    print(f"roofline: {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s, {roof['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
          flush=True)
    batches = [32, 256] if args.quick else [int(b) for b in args.batches.split(",")]
    sections = args.sections.split(",")
    mbgmv = []
    for ranks in ([[int(r) for r in rs.split(",")] for rs in args.ranks.split(";")] if "mbgmv" in sections else []):
        for batch in batches:
            for distinct in (1, 8, 64, 256):
                if distinct > batch or time.perf_counter() - started > args.budget:
                    continue
                row = bench_mbgmv(rng, roof, batch, distinct, ranks, baselines=args.baselines.split(","))
                mbgmv.append(row)
                print(json.dumps(row), flush=True)
    results["mbgmv"] = mbgmv
    results["mbgmm"] = [bench_mbgmm(rng, roof, s, n, r) for s, n, r in
                        ((8, 256, [8, 16, 32, 64]), (1, 2048, [16]), (64, 64, [8, 16, 32, 64]))
                        if "mbgmm" in sections]
    print(json.dumps(results["mbgmm"]), flush=True)
    attn = []
    for heads, kv in ((32, 32), (32, 8)) if "decode" in sections else ():
        for batch in ([64] if args.quick else [1, 64]):
            for context in (128, 1024, 4096):
                if batch * context * kv * 128 * 4 > 20e9 or time.perf_counter() - started > args.budget:
                    continue
                attn.append(bench_decode_attention(rng, roof, batch, context, heads, kv))
                print(json.dumps(attn[-1]), flush=True)
    results["decode_attention"] = attn
    with open(os.path.join(os.environ.get("OUT", "."), "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)
    results["prefill_attention"] = [bench_prefill_attention(rng, roof, 4, 512, h, kv) for h, kv in ((32, 32), (32, 8))
                                    if "prefill" in sections]
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)

    print("\npool padding (rank 16):")
    for r in results["padding"]:
        print(f"  {r['model']:11s} {r['targets']:26s} W={r['page_width']:5d} {r['pages_per_rank']:4d} pages/rank "
              f"padding {100 * r['padding_share']:.1f}%")
    print(f"\nMBGMV (H=4096, bf16)  roofline {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'ranks':>12s} {'batch':>5s} {'adap':>4s} {'err':>8s} {'us':>8s} {'%BW':>5s} {'onehot':>8s} "
          f"{'bmm':>8s} {'take':>8s} {'x1hot':>6s} {'gathered us (%BW, k)':>21s} {'x1hot':>6s}")
    for r in mbgmv:
        print(f"{str(r['ranks']):>12s} {r['batch']:5d} {r['distinct']:4d} {r['rel_err']:8.1e} {r['us']:8.1f} "
              f"{100 * r['bw_share']:5.1f} {r['onehot_us']:8.1f} {r['bmm_us']:8.1f} {r['take_us']:8.1f} "
              f"{r['speedup_vs_onehot']:6.1f} {r['gathered_us']:8.1f} ({100 * r['gathered_bw_share']:3.0f}%, "
              f"{r['gathered_k']}) {r['gathered_vs_onehot']:6.1f}")
    print("\nMBGMM (H=4096, bf16)")
    for r in results["mbgmm"]:
        print(f"  tokens {r['tokens']:5d} segments {r['segments']:3d} ranks {r['ranks']} err {r['rel_err']:.1e} "
              f"{r['us']:.1f} us {r['tflops']:.1f} TFLOP/s {100 * r['bw_share']:.1f}%BW  bmm {r['bmm_us']:.1f} us")
    print("\npaged decode attention (D=128, bf16)")
    for r in attn:
        print(f"  H {r['heads']:2d}/{r['kv_heads']:2d} batch {r['batch']:3d} ctx {r['context']:5d} "
              f"err {r['rel_err']:.1e} "
              f"{r['us']:9.1f} us {100 * r['bw_share']:5.1f}%BW  xla-gather {r['xla_gather_us']:9.1f} us")
    print("\npaged prefill attention (D=128, bf16)")
    for r in results["prefill_attention"]:
        print(f"  H {r['heads']}/{r['kv_heads']} {r['seqs']}x{r['new_tokens']} err {r['rel_err']:.1e} "
              f"{r['us']:.1f} us {r['tflops']:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
