"""Tensor parallelism (Megatron partition under shard_map)."""
from jslora.parallel.tensor_parallel import TP_AXIS, local_config, make_mesh, param_specs, shard_params

__all__ = ["TP_AXIS", "local_config", "make_mesh", "param_specs", "shard_params"]
