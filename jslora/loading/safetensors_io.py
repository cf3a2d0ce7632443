"""Reading safetensors files into numpy without torch."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import safe_open


class TensorReader:
    """Name -> numpy array over one safetensors file or a sharded set with an index.

    numpy has no bfloat16, so those tensors go through safetensors' flax API (ml_dtypes' bfloat16).
    """

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self._where: dict[str, tuple[Path, object]] = {}
        for path in files:
            handle = self._stack.enter_context(safe_open(str(path), framework="np"))
            for name in handle.keys():
                self._where[name] = (path, handle)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TensorReader:
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.exists():
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return cls([model_dir / s for s in shards])
        if single.exists():
            return cls([single])
        raise FileNotFoundError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json (only safetensors is read)")

    def keys(self):
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        path, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except TypeError:  # bfloat16 and other dtypes numpy does not know
            with safe_open(str(path), framework="flax") as flax_handle:
                return np.asarray(flax_handle.get_tensor(name))

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
