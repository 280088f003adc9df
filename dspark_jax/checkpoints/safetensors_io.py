"""The safetensors format, through the `safetensors` library.

`safe_open(..., framework="numpy")` reads lazily: `get_slice(name)[rows, cols]` reads only
that block from disk (a device that owns one shard of a weight reads only its block), and
bf16 tensors come back as `ml_dtypes.bfloat16` arrays. This module adds error messages that
name the file and the tensor, and writes files atomically with the usual permissions.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy reader asks for)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as _save_numpy

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not hold the tensors the model needs."""


class SafetensorsFile:
    """The tensors of one .safetensors file, read lazily."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = safe_open(path, framework="numpy")
        except SafetensorError as e:
            raise CheckpointError(_diagnose(path, e)) from e
        self._slices = {name: self._file.get_slice(name) for name in self._file.keys()}

    def keys(self) -> list[str]:
        return list(self._slices)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name].get_shape())

    def rows(self, name: str, start: int, stop: int, columns: tuple[int, int] | None = None) -> np.ndarray:
        """Rows start..stop-1 of a tensor, of a matrix only `columns` (c0, c1) when given; read
        from disk now, nothing else (a column block by one 2-D slice: 8x faster than slicing rows)."""
        if columns is None:
            return self._slices[name][start:stop]
        return self._slices[name][start:stop, columns[0] : columns[1]]

    def array(self, name: str) -> np.ndarray:
        """A whole tensor."""
        return self._file.get_tensor(name)


def _diagnose(path: str, error: Exception) -> str:
    """The library's refusal made specific (for a truncated file it says only "incomplete
    metadata, file not fully covered"): the first tensor whose bytes the file lacks."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len)) if header_len <= size - 8 else {}
        data_size = size - 8 - header_len
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            needed = math.prod(entry["shape"]) * _ITEMSIZE.get(entry["dtype"], 0)
            if end > data_size or end - begin != needed:
                return (f"{path}: tensor {name!r} with shape {tuple(entry['shape'])} and dtype {entry['dtype']} "
                        f"needs bytes [{begin}, {begin + needed}) but the file has {data_size} data bytes "
                        "(truncated?)")
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError):
        pass  # no readable header: the library's own words
    return f"{path}: not a readable safetensors file ({error})"


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (ml_dtypes.bfloat16 included) as a .safetensors file, atomically."""
    tmp = path + ".tmp"
    try:
        _save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                    metadata=None if metadata is None else {str(k): str(v) for k, v in metadata.items()})
    except (SafetensorError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot store these tensors in safetensors ({e})") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the library creates its files 0600; give the mode open() would
    os.replace(tmp, path)
