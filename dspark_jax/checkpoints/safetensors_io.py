"""Reading and writing the safetensors format with numpy memory maps.

Our own reader (rather than `safetensors.numpy`) so that bf16 tensors come back as
`ml_dtypes.bfloat16` arrays and slices of a tensor are read lazily from disk: a device that
owns one shard of a weight reads only those rows.

Format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header),
then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not hold the tensors the model needs."""


class SafetensorsFile:
    """Lazily memory-mapped tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise CheckpointError(f"{path}: header length {header_len} exceeds file size {size}")
                header = json.loads(f.read(header_len))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        self._mmap = None
        data_size = size - self._data_start
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = entry["dtype"]
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            expected = math.prod(entry["shape"]) * _DTYPES[dtype].itemsize
            if end - begin != expected or end > data_size:
                raise CheckpointError(
                    f"{path}: tensor {name!r} with shape {tuple(entry['shape'])} and dtype {dtype} "
                    f"needs bytes [{begin}, {begin + expected}) but the file has {data_size} data bytes "
                    f"and the header says [{begin}, {end})"
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def array(self, name: str) -> np.ndarray:
        """Read-only memory-mapped view of one tensor (no data is read until it is indexed)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (ml_dtypes.bfloat16 included) as a .safetensors file, names sorted."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        arrays[name] = arr
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(arr.tobytes())
    os.replace(tmp, path)
