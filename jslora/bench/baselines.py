"""The ablation baselines `jslora bench` compares the engine against, built from the engine's public
hooks (Engine's `backend`, `allocators` and `policy`) so that none of them lives in the production path.

- BMM: Pallas attention, LoRA by gathering each row's A and B into buffers padded to the largest rank
  and a batched matmul (S-LoRA's "bmm" ablation of its MBGMV/MBGMM kernels).
- WITHOUT_LORA_COMMUNICATION: the Pallas kernels with the column-parallel LoRA's all-gathers replaced
  by a local copy. Its outputs are wrong by design: it only measures what the gathers cost, as S-LoRA's
  tensor-parallel experiment does.
- SingleAdapter: the peft-style scheduling, one adapter per running batch.
- split_pool(share): adapters in a fixed buffer (share of the pool's blocks), KV in the rest; neither
  can borrow from the other (S-LoRA's "no unified memory" ablation).
"""
from __future__ import annotations

import jax.numpy as jnp

from jslora.memory import BlockAllocator
from jslora.model.backend import Backend
from jslora.scheduler.policies import Policy

BMM = Backend("bmm", pallas_attention=True, pallas_lora=False)


class _WithoutLoraCommunication(Backend):
    def gather_rank_slices(self, v, tp: int):
        return jnp.tile(v, (1, 1, tp))  # this device's slice in every device's place: same shapes, no traffic


WITHOUT_LORA_COMMUNICATION = _WithoutLoraCommunication("pallas-without-lora-communication", True, True)


def split_pool(adapter_share: float = 0.25):
    """Engine `allocators` for the no-unified baseline: the last adapter_share of the blocks hold
    adapters, the rest KV (block 0 is the null block)."""
    def allocators(num_blocks: int, kv_block: int) -> tuple[BlockAllocator, BlockAllocator]:
        split = num_blocks - max(1, int(adapter_share * num_blocks))
        return (BlockAllocator(num_blocks, kv_block, range(1, split)),
                BlockAllocator(num_blocks, kv_block, range(split, num_blocks)))
    return allocators


class SingleAdapter(Policy):
    """The peft-style baseline: every running request shares one adapter; requests of another
    adapter wait until the batch drains, then the oldest waiting request's adapter takes over."""
    name = "single-adapter"

    def order(self, waiting, now):
        running = self.scheduler.running
        if running:
            current = running[0].adapter_name
        elif waiting:
            current = min(waiting, key=lambda r: r.arrival).adapter_name
        else:
            return []
        return sorted((r for r in waiting if r.adapter_name == current), key=lambda r: r.arrival)
