"""A step's rows, by one rule for the scheduler that plans it, the runner that launches it and the simulator
that costs it: decode rows and each prompt chunk in whole tiles (a prefill tile holds one sequence's tokens),
padded up to the smallest compiled row count (bucket) that holds them."""
from __future__ import annotations

from collections.abc import Iterable

from pallas_kernels.pool import round_up

# step rows from which the matmuls are compute-bound, so padding costs their time (H200 ~170, H100 ~230)
COMPUTE_BOUND_ROWS = 256


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n."""
    return min(b for b in buckets if b >= n)


def step_rows(num_decode: int, chunk_lengths: Iterable[int], tile: int) -> int:
    """Rows a step of num_decode decode rows and these prompt chunks needs, before its bucket."""
    return round_up(num_decode, tile) + sum(round_up(n, tile) for n in chunk_lengths)


def launched_rows(num_decode: int, chunk_lengths: list[int], decode_buckets: tuple[int, ...],
                  step_buckets: tuple[int, ...], tile: int) -> int:
    """Rows the step is launched with: the decode-only variant's bucket, or with chunks the step's."""
    if chunk_lengths:
        return bucket(step_rows(num_decode, chunk_lengths, tile), step_buckets)
    return bucket(num_decode, decode_buckets)
