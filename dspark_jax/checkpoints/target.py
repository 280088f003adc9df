"""`load_target`: a Target from a transformers directory (config.json + safetensors) or a GGUF
file; `save_target` writes the transformers form."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dspark_jax.checkpoints.binding import bindings_for, check_store, place, to_stored
from dspark_jax.checkpoints.safetensors_io import CheckpointError, save_file
from dspark_jax.checkpoints.store import hf_store, read_config_json
from dspark_jax.checkpoints.target_weights import gguf_bindings, hf_bindings, hf_prefix, hf_table
from dspark_jax.models.config import from_hf_config, to_hf_config
from dspark_jax.models.target import Target, param_shardings
from dspark_jax.sharding import DEFAULT_RULES, ShardingRules


def load_target(path: str, *, dtype: str = "bfloat16", mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
                attention: str = "xla") -> Target:
    """Loads a target from a transformers directory (config.json + safetensors) or a .gguf file.

    With a mesh, each parameter is created directly with the NamedSharding `rules` give it and
    every device reads only its own block from disk. `attention` is the implementation of
    `dspark_jax.models.attention` the target computes with ("xla" or "cudnn").
    """
    dtype = jnp.dtype(dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        config = from_hf_config(*read_config_json(path, "a transformers checkpoint directory"))
        config = dataclasses.replace(config, attention=attention)
        store = hf_store(path)
        shapes, shardings = param_shardings(config, dtype, mesh, rules)
        bindings = hf_bindings(shapes, store)
        ignorable = ("lm_head.weight",) if config.tie_word_embeddings else ()
        if hf_prefix(store) == "model.language_model.":  # a multimodal checkpoint: its other towers stay unread
            ignorable += tuple(n for n in store if not n.startswith("model.language_model.") and n != "lm_head.weight")
        tokenizer = _hf_tokenizer(path)
    elif path.endswith(".gguf"):
        from dspark_jax.checkpoints.gguf_file import GGUFCheckpoint

        ckpt = GGUFCheckpoint(path)
        config = dataclasses.replace(ckpt.config(), attention=attention)
        store = ckpt.store(config)
        shapes, shardings = param_shardings(config, dtype, mesh, rules)
        bindings = gguf_bindings(shapes, config.family)
        ignorable = ("rope_freqs.weight",)
        tokenizer = ckpt.tokenizer()
    else:
        raise CheckpointError(f"{path}: expected a transformers checkpoint directory or a .gguf file")
    check_store(bindings, store, path, ignorable)
    flat_shardings = {b.path: _lookup(shardings, b.path) for b in bindings}
    params = place(bindings, store, flat_shardings, dtype)
    return Target(config, params, tokenizer, dtype, mesh, rules)


def save_target(target: Target, path: str) -> None:
    """Writes `target` as a transformers directory (config.json + model.safetensors), which
    `load_target` and transformers read back."""
    os.makedirs(path, exist_ok=True)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target.params)
    tensors = {b.name: to_stored(b, np.asarray(jax.device_get(_lookup(target.params, b.path))))
               for b in bindings_for(shapes, hf_table("model."))}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**to_hf_config(target.config), "dtype": str(jnp.dtype(target.dtype))}, f, indent=2)
    if target.tokenizer is not None:
        target.tokenizer.save_pretrained(path)


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _hf_tokenizer(path: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
