"""A HF checkpoint converted once into an orbax checkpoint, restored straight onto the mesh.

`convert` reads the safetensors weights (jslora.loading.checkpoint), and writes the per-layer params
with orbax under <out>/params, beside the model's config.json and tokenizer files, so <out> is a model
directory `LLM` and `jslora serve` accept. `restore` asks orbax for each array with its tensor-parallel
sharding, so every device reads only its own shard from disk: no full copy on one device, no resharding.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jslora.config import ModelConfig
from jslora.loading.checkpoint import load_hf_params
from jslora.model.llama import unstack_layers

PARAMS_DIR = "params"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json")


def has_orbax_params(model_dir: str | Path) -> bool:
    return (Path(model_dir) / PARAMS_DIR).is_dir()


def convert(model_dir: str | Path, out_dir: str | Path, dtype=jnp.bfloat16) -> Path:
    import orbax.checkpoint as ocp

    model_dir, out_dir = Path(model_dir), Path(out_dir).absolute()
    cfg = ModelConfig.from_file(model_dir / "config.json")
    params = unstack_layers(load_hf_params(model_dir, cfg, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
    return out_dir


def restore(model_dir: str | Path, cfg: ModelConfig, mesh=None, dtype=None) -> dict:
    """The params of a converted checkpoint, each array placed with its tensor-parallel sharding over
    `mesh` (or on the default device without one), in `dtype` if given."""
    import orbax.checkpoint as ocp

    from jslora.parallel import param_specs

    checkpointer = ocp.StandardCheckpointer()
    path = Path(model_dir).absolute() / PARAMS_DIR
    stored = checkpointer.metadata(path)
    for wrapper in ("item_metadata", "tree"):  # orbax versions wrap the tree differently
        stored = getattr(stored, wrapper, stored)
    specs = param_specs(jax.tree.map(lambda m: None, stored, is_leaf=lambda m: hasattr(m, "shape")), cfg)
    device = jax.devices()[0]

    def target(meta, spec):
        sharding = NamedSharding(mesh, spec) if mesh is not None else jax.sharding.SingleDeviceSharding(device)
        return jax.ShapeDtypeStruct(meta.shape, dtype or meta.dtype, sharding=sharding)

    abstract = jax.tree.map(target, stored, specs, is_leaf=lambda m: hasattr(m, "shape"))
    return checkpointer.restore(path, abstract)
