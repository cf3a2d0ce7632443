"""Reading safetensors files into numpy without torch."""
from __future__ import annotations

import functools
import json
import math
from contextlib import ExitStack
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
# dtypes stack() takes straight from a file's bytes
_VIEW_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": ml_dtypes.bfloat16, **_RAW_DTYPES}


@functools.lru_cache(maxsize=64)
def _raw_header(path: Path, modified_ns: int) -> tuple[int, dict]:
    """A safetensors file's header (an 8-byte length, then JSON: each tensor's dtype, shape and byte
    offsets), parsed once per file version (modified_ns: a rewritten file is read again)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return header_len, json.loads(f.read(header_len))


def _raw_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor read straight from the file's layout, for dtypes safetensors' numpy API cannot give."""
    header_len, header = _raw_header(path, path.stat().st_mtime_ns)
    info = header[name]
    if info["dtype"] not in _RAW_DTYPES:
        raise TypeError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which cannot be read")
    start, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + header_len + start)
        data = f.read(end - start)
    return np.frombuffer(data, _RAW_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()


class TensorReader:
    """Name -> numpy array over one safetensors file or a sharded set with an index.

    numpy has no bfloat16 or float8, so those tensors go through safetensors' flax API (ml_dtypes' types).
    """

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self._where: dict[str, tuple[Path, object]] = {}
        self._bytes: dict[Path, tuple[bytes, int, dict]] = {}  # stack()'s reads: (file, data start, header)
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

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """From the file's header alone (no data read): the shape, and safetensors' dtype name ("BF16",
        "F32", "I64", ...)."""
        piece = self._where[name][1].get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()

    def get(self, name: str) -> np.ndarray:
        path, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except TypeError:  # bfloat16 and other dtypes numpy does not know
            with safe_open(str(path), framework="flax") as flax_handle:
                return np.asarray(flax_handle.get_tensor(name))
        except AttributeError:  # float8: safetensors looks for np.float8_e4m3fn, which numpy lacks
            return _raw_tensor(path, name)

    def stack(self, names: list[str]) -> np.ndarray:
        """Tensors of one file, shape and dtype as one array [n, ...], taken from one read of the file in
        one indexing operation: a strided view where they sit evenly spaced (a PEFT file's layers do),
        else a gather (else, for other dtypes or mixed files, get() one by one). Few NumPy operations,
        so a loader thread releases and re-takes the GIL a few times, not a few per tensor."""
        paths = {self._where[n][0] for n in names}
        if len(paths) != 1:
            return np.stack([self.get(n) for n in names])
        path = paths.pop()
        if path not in self._bytes:
            raw = path.read_bytes()
            header_len = int.from_bytes(raw[:8], "little")
            self._bytes[path] = (raw, 8 + header_len, json.loads(raw[8: 8 + header_len]))
        raw, data_start, header = self._bytes[path]
        infos = [header[n] for n in names]
        dtype, shape = _VIEW_DTYPES.get(infos[0]["dtype"]), tuple(infos[0]["shape"])
        item = np.dtype(dtype).itemsize if dtype is not None else 1
        starts = np.array([data_start + i["data_offsets"][0] for i in infos])
        if (dtype is None or any(i["dtype"] != infos[0]["dtype"] or tuple(i["shape"]) != shape for i in infos)
                or (starts % item).any()):
            return np.stack([self.get(n) for n in names])
        size = math.prod(shape)
        flat = np.frombuffer(raw, dtype, len(raw) // item)
        order = np.argsort(starts)
        steps = np.diff(starts[order])
        if len(names) > 1 and (steps == steps[0]).all() and steps[0] >= size * item:
            view = np.lib.stride_tricks.as_strided(flat[starts[order[0]] // item:], (len(names), size),
                                                   (int(steps[0]), item), writeable=False)
            return view[np.argsort(order)].reshape(len(names), *shape)  # rows back in the order asked
        return flat[np.add.outer(starts // item, np.arange(size))].reshape(len(names), *shape)

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def close(self):
        self._bytes.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
