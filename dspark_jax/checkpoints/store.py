"""Tensor stores: named 2-D/1-D weights that can be read a block of rows at a time.

A store maps checkpoint tensor names to `StoredTensor`s in the checkpoint's own layout
(Linear weights [out, in], as transformers stores them). `hf_store` covers a transformers
directory (one model.safetensors, or shards listed in model.safetensors.index.json);
`dspark_jax.checkpoints.gguf_file` builds the same interface over a GGUF file.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable

import numpy as np

from dspark_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint; `read_rows(start, stop, columns=None)` returns rows
    [start, stop) of dim 0, and of a matrix only columns [c0, c1) when `columns=(c0, c1)`."""

    name: str
    file: str
    shape: tuple[int, ...]
    read_rows: Callable[..., np.ndarray]


Store = dict[str, StoredTensor]


def read_config_json(directory: str, expected: str) -> tuple[dict, str]:
    """(The parsed config.json of a checkpoint directory, its path); `expected` names the kind
    of directory in the error when the file is missing."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no config.json (expected {expected})")
    with open(path) as f:
        try:
            return json.load(f), path
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _safetensors_entries(f: SafetensorsFile, names: list[str]) -> Store:
    def reader(name):
        return lambda start, stop, columns=None: f.rows(name, start, stop, columns)

    return {name: StoredTensor(name, f.path, f.shape(name), reader(name)) for name in names}


def hf_store(directory: str) -> Store:
    """All tensors of a transformers checkpoint directory."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as fh:
            try:
                weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from e
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        store: Store = {}
        for file, names in sorted(by_file.items()):
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index_path} lists {file}, which does not exist (needed for {names[0]!r})")
            f = SafetensorsFile(path)
            missing = sorted(set(names) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path}: the index says it holds {missing[0]!r}, but it does not")
            store.update(_safetensors_entries(f, names))
        return store
    files = [single] if os.path.exists(single) else sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or *.safetensors")
    store = {}
    for path in files:
        f = SafetensorsFile(path)
        store.update(_safetensors_entries(f, f.keys()))
    return store
