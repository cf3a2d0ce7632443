"""The pool's adapter residency on its own (host only): the count of blocks that evicting idle adapters can
free, kept as adapters come and go rather than summed over them on every KV growth, stays exact."""
from __future__ import annotations

import numpy as np

from jslora.memory import AdapterResidency, BlockAllocator


def test_reclaimable_blocks_follow_every_change(rng):
    allocator = BlockAllocator(64, 16)
    residency = AdapterResidency(allocator, 6)
    held: list[int] = []  # one uid per reference taken
    for step in range(400):
        op = rng.integers(5)
        idle = [u for u in residency.resident if residency.resident[u].refs == 0]
        if op == 0:
            uid = 1000 + step
            if residency.make_room(residency.blocks_for_pages(16 * int(rng.integers(1, 4))), need_slot=True):
                residency.install(uid, {}, 16 * int(rng.integers(1, 4)))
        elif op == 1 and residency.resident:
            uid = int(rng.choice(list(residency.resident)))
            if not residency.resident[uid].retired:
                residency.acquire(uid)
                held.append(uid)
        elif op == 2 and held:
            residency.release(held.pop(int(rng.integers(len(held)))))
        elif op == 3 and residency.resident:
            residency.retire(int(rng.choice(list(residency.resident))))
        elif op == 4:
            free_before, evictions = allocator.num_free, residency.evictions
            assert residency.make_room(min(free_before, int(rng.integers(0, 8))))
            assert residency.evictions == evictions  # enough was free: nothing evicted
            residency.make_room(int(rng.integers(0, 64)))  # may evict idle adapters, oldest first
        idle = [u for u in residency.resident if residency.resident[u].refs == 0 and not residency.resident[u].retired]
        assert residency.reclaimable_blocks == sum(len(residency.resident[u].blocks) for u in idle)
        assert allocator.num_free + residency.blocks_in_use == allocator.capacity
    assert np.unique([residency.resident[u].slot for u in residency.resident]).size == len(residency.resident)
