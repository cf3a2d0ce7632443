"""Host-side bookkeeping of the unified pool: page blocks, KV block tables, adapter residency, the
prefix cache."""
from jslora.memory.adapter_residency import AdapterResidency, ResidentAdapter
from jslora.memory.allocator import BlockAllocator, OutOfPages, kv_blocks
from jslora.memory.block_tables import BlockTables
from jslora.memory.prefix_cache import PrefixCache

__all__ = ["BlockAllocator", "OutOfPages", "kv_blocks", "BlockTables", "AdapterResidency", "ResidentAdapter",
           "PrefixCache"]
