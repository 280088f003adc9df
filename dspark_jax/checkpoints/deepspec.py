"""Draft checkpoints in DeepSpec's format: config.json + model.safetensors, reference tensor names.

The released deepseek-ai/{dspark,dflash}_*_block7 and eagle3_*_ttt7 checkpoints, vLLM and
SGLang all use these names (no "model." prefix, Linear weights [out, in], bf16). Saved drafts
include the frozen `embed_tokens.weight` and `lm_head.weight`, as the format expects, unless
saved with `frozen=False`: such a slim draft (under half the size for SmolLM2) loads only
here and only with its target, whose embedding and LM head it uses anyway; DeepSpec, vLLM and
SGLang need the full format, which `save_draft(load_draft(slim, target=t), path)` writes.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from dspark_jax.checkpoints.binding import NameTable, bindings_for, check_store, place, to_stored
from dspark_jax.checkpoints.safetensors_io import CheckpointError, save_file
from dspark_jax.checkpoints.store import hf_store, read_config_json
from dspark_jax.checkpoints.target_weights import layer_table
from dspark_jax.models.draft import FROZEN, Draft, abstract_module_params
from dspark_jax.models.draft_config import DraftConfig, check_draft_fits, draft_from_hf, draft_to_hf
from dspark_jax.sharding import DEFAULT_RULES, ShardingRules, named_sharding

_FROZEN_TABLE: NameTable = {("embed_tokens",): ("embed_tokens.weight", None), ("lm_head",): ("lm_head.weight", 1)}
_FROZEN_AXES = {"embed_tokens": ("vocab", "embed"), "lm_head": ("embed", "vocab")}

BLOCK_TABLE: NameTable = {
    ("fc",): ("fc.weight", 1),
    ("hidden_norm", "scale"): ("hidden_norm.weight", None),
    ("norm", "scale"): ("norm.weight", None),
    **layer_table(""),
    ("markov_head", "markov_w1"): ("markov_head.markov_w1.weight", None),
    ("markov_head", "markov_w2"): ("markov_head.markov_w2.weight", None),
    ("markov_head", "gate_proj", "kernel"): ("markov_head.gate_proj.weight", 1),
    ("markov_head", "gate_proj", "bias"): ("markov_head.gate_proj.bias", None),
    ("markov_head", "joint_proj", "kernel"): ("markov_head.joint_proj.weight", 1),
    ("markov_head", "joint_proj", "bias"): ("markov_head.joint_proj.bias", None),
    ("confidence_head", "proj", "kernel"): ("confidence_head.proj.weight", 1),
    ("confidence_head", "proj", "bias"): ("confidence_head.proj.bias", None),
    **_FROZEN_TABLE,
}

EAGLE3_TABLE: NameTable = {
    ("fc",): ("fc.weight", 1),
    ("norm", "scale"): ("norm.weight", None),
    ("layers", "hidden_norm", "scale"): ("layers.{i}.hidden_norm.weight", None),
    **layer_table(""),
    **_FROZEN_TABLE,
}


def _table(config: DraftConfig) -> NameTable:
    return EAGLE3_TABLE if config.algorithm == "eagle3" else BLOCK_TABLE


def _frozen_shapes(config: DraftConfig, dtype) -> dict:
    v, h = config.layers.vocab_size, config.layers.hidden_size
    return {"embed_tokens": jax.ShapeDtypeStruct((v, h), dtype), "lm_head": jax.ShapeDtypeStruct((h, v), dtype)}


def load_draft(path: str, *, target=None, dtype: str = "bfloat16", mesh: Mesh | None = None,
               rules: ShardingRules = DEFAULT_RULES) -> Draft:
    """Reads a DeepSpec-format draft directory.

    With a target, the draft uses the target's embedding and LM head arrays (the checkpoint's
    copies, if it has them, are checked for shape but not loaded) and must match its
    vocabulary, hidden size and layer count. Every draft tensor is checked: a missing,
    unexpected or mis-shaped one raises an error naming it and the expected shape.
    """
    dtype = jnp.dtype(dtype)
    config = draft_from_hf(*read_config_json(path, "a DeepSpec draft directory"))
    store = hf_store(path)
    shapes, specs = abstract_module_params(config, dtype)
    bindings = bindings_for({**shapes, **_frozen_shapes(config, dtype)}, _table(config))
    slim = target is not None and not any(b.name in store for b in bindings if b.path[0] in FROZEN)
    check_store([b for b in bindings if not (slim and b.path[0] in FROZEN)], store, path)
    frozen = {}
    if target is not None:
        try:
            check_draft_fits(config, target.config)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        frozen = Draft.frozen(target.params)
        if not slim:
            _warn_if_frozen_differ(store, target, path)
        bindings = [b for b in bindings if b.path[0] not in FROZEN]

    def sharding(b):
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        if b.path[0] in FROZEN:
            return named_sharding(mesh, _FROZEN_AXES[b.path[0]], b.shape, rules)
        spec = specs
        for key in b.path:
            spec = spec[key]
        return named_sharding(mesh, tuple(spec), b.shape, rules)

    params = place(bindings, store, {b.path: sharding(b) for b in bindings}, dtype)
    return Draft(config, {**params, **frozen}, dtype, mesh)


def _warn_if_frozen_differ(store, target, source: str, rows: int = 4) -> None:
    """Compares a few embedding rows of the checkpoint with the target's (they are copies)."""
    embed = np.asarray(target.params["embed_tokens"][:rows], np.float32)
    stored = np.asarray(store["embed_tokens.weight"].read_rows(0, rows), np.float32)
    if not np.allclose(embed, stored, rtol=1e-2, atol=1e-3):
        warnings.warn(f"{source}: embed_tokens.weight differs from the target's embedding; "
                      "the draft was trained for another target (or the target is quantized)")


def save_draft(draft: Draft, path: str, *, frozen: bool = True) -> None:
    """Writes `draft` as config.json + model.safetensors in DeepSpec's format; frozen=False
    leaves out the embedding and LM head (see the module doc)."""
    os.makedirs(path, exist_ok=True)
    config = draft.config
    params = dict(draft.params)
    if not frozen:
        params = {k: v for k, v in params.items() if k not in FROZEN}
    elif "lm_head" not in params:  # tied target: the LM head is the embedding
        params["lm_head"] = params["embed_tokens"].T
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tensors = {}
    for b in bindings_for(shapes, _table(config)):
        value = params
        for key in b.path:
            value = value[key]
        tensors[b.name] = to_stored(b, np.asarray(jax.device_get(value)))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(draft_to_hf(config), f, indent=2, sort_keys=True)
