"""Host-side bookkeeping of the unified pool: page blocks, KV block tables, adapter residency."""
from jslora.memory.adapter_residency import AdapterResidency, ResidentAdapter
from jslora.memory.allocator import BlockAllocator, OutOfPages

__all__ = ["BlockAllocator", "OutOfPages", "AdapterResidency", "ResidentAdapter"]
