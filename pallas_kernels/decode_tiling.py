"""How a decode attention call is tiled (pallas_kernels.attention.paged_decode_attention_counted): the launch
rule and the module-level switches benchmarks flip for A/B runs (read when a step is traced)."""
from __future__ import annotations

# where split contexts' partial softmaxes merge by default: "auto" (decode_launch_params), "xla" or "kernel"
DECODE_COMBINE = "auto"
KERNEL_COMBINE_PROGRAMS = 8  # "auto" merges in the kernel when this few programs split...
KERNEL_COMBINE_SPLITS = 32   # ... into at most this many splits
MIN_SPLIT_KEYS = 0  # the fewest keys a split of the context holds (decode_launch_params)
# where decode steps read the next block's page ids one step ahead, with 3 pipeline stages
# (decode_launch_params): "gqa" (one KV head a program, unsplit), "always" or "never"
PREFETCH_PAGES = "gqa"
# decode reads no K/V row past a sequence's length (masked gathers; the masked loads give zeros, so the value
# rows need no zeroing); False: those rows read the null page and are zeroed. On an H200, in one run
# (twenty-ninth session, RESULTS.md): the engine's call at batch 256 took 177.8 against 191.5 µs for Llama-7B
# (lengths ~159), 166.6 against 190.0 (lengths ~143) and 46.3 against 54.5 µs for Llama-3-8B
MASK_PADDING = True
# batch 1 of a GQA model over a bf16 cache split 32 ways (decode_launch_params): two warps a program with page ids
# a step ahead (H100, forty-second session: 13.4 against 15.0 µs a call at context 4,096); False: 4 warps, 2 stages
# as before
SINGLE_SEQUENCE_PIPELINE = True
# a program's KV heads share one query tile, packed block-diagonally (attention._load_packed_q): one dot and one online
# softmax a step for all of them, where MHA pads each head's one query row to a 16-row tile of its own. With 3
# stages, on an H100 (thirty-seventh session): 18% fewer instructions a step for the FP8 cache (sm_90a SASS),
# MHA decode 4-17% faster over an FP8 cache and 0-3% over bf16, the engine's FP8 call at batch 256 / context
# ~518 390 against 414 µs, S1 with the FP8 cache 31.40 against 30.83 req/s
PACK_HEADS = True


def decode_launch_params(batch: int, num_kv_heads: int, group: int, max_context: int, *, kv_fp8: bool = False,
                         sms: int = 132) -> dict:
    """Tiling of a decode attention call (measured on an H200: benchmarks/RESULTS.md, attention run 1):
    two KV heads per program when the 16-row query tile holds few real rows (MHA); 32 keys a step,
    which keeps several programs per multiprocessor (64-key steps were 18-43% slower at context 160);
    and, when batch x heads cannot fill the multiprocessors, the context split over programs
    (flash-decoding) in 64-key steps. Two warps a program when single-pass (run 2: 3-8% faster). Combine
    "auto": where one sequence's KV heads split (batch 1 of Llama-3-8B), the splits merge in the kernel at
    up to 32 splits (13.2 µs a call at context 4096 against 14.3 for 64 splits and XLA's merge); with more
    programs the merge's code slows the split pass (batch 8: 49.2 against 38.9 µs), so XLA merges
    (twenty-first session). At batch 1 the kernel merges with one KV head a program, MHA too: two heads
    doubled the merge's code (Llama-7B's heads, context 160 in a 2,048-wide table: 9.7 µs a call against
    18.0 with two heads, and 11.7 for XLA's merge; twenty-fifth session). With one KV head a program and the
    context unsplit (GQA at batch 32-256), each step reads the next block's page ids and the pipeline is 3
    deep: Nsight Compute showed the steps stalled on dependent loads at 8-12 resident warps an SM, and Llama-3's
    heads ran 12-24% faster (context 160 and 1,024, an FP8 cache and bf16 alike; bf16 at context 160 within 2%).
    Two MHA heads a program spilled at 3 stages (bf16 19% slower; twenty-eighth session); packed into one query
    tile (PACK_HEADS, unsplit launches) they hold fewer registers and run 3 stages, which packed tiles need:
    at 2 they were slower than apart (thirty-seventh session)."""
    heads_per_program = 2 if group < 4 and num_kv_heads % 2 == 0 else 1
    programs = batch * num_kv_heads // heads_per_program
    splits = 1
    while programs * splits < 2 * sms and splits * 128 <= max_context:
        splits *= 2
    combine = DECODE_COMBINE
    if combine == "auto":
        combine = "kernel" if programs <= KERNEL_COMBINE_PROGRAMS or batch == 1 else "xla"
        heads_per_program = 1 if batch == 1 else heads_per_program
        splits = min(splits, KERNEL_COMBINE_SPLITS) if combine == "kernel" else splits
    block_k = 64 if splits > 1 else 32
    if PREFETCH_PAGES not in ("gqa", "always", "never"):
        raise ValueError(f"PREFETCH_PAGES must be 'gqa', 'always' or 'never', not {PREFETCH_PAGES!r}")
    # batch 1 of a GQA model over a bf16 cache at a full 32-way split merged in the kernel: two warps with page
    # ids a step ahead, 13.4-13.7 against 15.0-15.3 µs a call at context 4,096, 7.7 against 8.4 at 160 and even
    # at 1,024 in an 8,192-wide table (H100, forty-second and forty-third sessions). Over the FP8 cache it was
    # even at 4,096 and 9-10% slower at 160 and 1,024 (6.8 / 7.6 against 7.5 / 8.3 µs); at batch 4-8, context
    # 1,024 and MHA even or slower
    long_gqa_single = (SINGLE_SEQUENCE_PIPELINE and batch == 1 and group > 1 and combine == "kernel"
                       and splits >= KERNEL_COMBINE_SPLITS and not kv_fp8)
    prefetch = PREFETCH_PAGES == "always" or (
        PREFETCH_PAGES == "gqa" and heads_per_program == 1 and (splits == 1 or long_gqa_single))
    # packed tiles at 2 stages were slower (thirty-seventh session); only the unsplit MHA launch was timed
    pack = PACK_HEADS and heads_per_program > 1 and splits == 1
    return {"block_k": min(block_k, max(16, 1 << (max_context - 1).bit_length())),
            "heads_per_program": heads_per_program, "splits": splits, "min_split_keys": MIN_SPLIT_KEYS,
            "num_warps": 2 if splits == 1 or long_gqa_single else 4, "combine": combine, "prefetch_pages": prefetch,
            "num_stages": 3 if prefetch or pack else 2, "pack_heads": pack}
