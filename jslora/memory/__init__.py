"""Host-side bookkeeping of the unified pool: page blocks, KV block tables, adapter residency."""
from jslora.memory.allocator import BlockAllocator, OutOfPages
from jslora.memory.adapter_residency import AdapterResidency, ResidentAdapter

__all__ = ["BlockAllocator", "OutOfPages", "AdapterResidency", "ResidentAdapter"]
