"""Binding decoder parameters to checkpoint tensors, checking them, and placing them on devices.

A `Binding` says where one parameter of `dspark_jax.models.transformer.Decoder` comes from:
the checkpoint tensor name (one per layer for stacked layer weights), the shape that tensor
must have, and how its layout maps to ours (Linear weights are [out, in] on disk and
input-major here, e.g. q_proj [H, N, D]). `read` produces any rectangular block of the
parameter from only the rows of the stored tensors it needs, which is what lets each device
read only its own shard (`jax.make_array_from_callback`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from dspark_jax.checkpoints.safetensors_io import CheckpointError
from dspark_jax.checkpoints.store import Store
from dspark_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Binding:
    path: Path  # key path in the params pytree
    names: tuple[str, ...]  # stored tensor, or one per layer if `stacked`
    stored_shape: tuple[int, ...]  # shape each stored tensor must have
    shape: tuple[int, ...]  # our parameter's shape ([L, ...] if stacked)
    n_in: int | None = None  # None: same layout; k: Linear whose first k dims (ours) are its input
    stacked: bool = False

    def read(self, store: Store, index: tuple[slice, ...]) -> np.ndarray:
        """The block `param[index]` as a numpy array, in the stored dtype or float32."""
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape)]
        if not self.stacked:
            return self._read_one(store[self.names[0]], bounds)
        (l0, l1), rest = bounds[0], bounds[1:]
        return np.stack([self._read_one(store[self.names[l]], rest) for l in range(l0, l1)])

    def _read_one(self, tensor, bounds: list[tuple[int, int]]) -> np.ndarray:
        shape = self.shape[1:] if self.stacked else self.shape
        rest = tuple(slice(a, b) for a, b in bounds[1:])
        if self.n_in is None:
            return tensor.read_rows(*bounds[0])[(slice(None),) + rest]
        in_dims, out_dims = shape[: self.n_in], shape[self.n_in :]
        in_bounds, out_bounds = bounds[: self.n_in], bounds[self.n_in :]
        r0, r1, out_cover = _cover(out_bounds, out_dims)
        c0, c1, in_cover = _cover(in_bounds, in_dims)
        block = np.asarray(tensor.read_rows(r0, r1))[:, c0:c1]  # [out rows, in cols]
        block = block.T.reshape(in_cover + out_cover)
        inner = (
            (slice(None),)
            + tuple(slice(a, b) for a, b in in_bounds[1:])
            + (slice(None),)
            + tuple(slice(a, b) for a, b in out_bounds[1:])
        )
        return block[inner]


def _cover(bounds: Sequence[tuple[int, int]], dims: Sequence[int]) -> tuple[int, int, tuple[int, ...]]:
    """Flat [start, stop) covering whole trailing dims of a block, and the covered shape."""
    inner = math.prod(dims[1:])
    a, b = bounds[0]
    return a * inner, b * inner, (b - a,) + tuple(dims[1:])


def _hf_names(prefix: str) -> dict[Path, str]:
    layer = prefix + "layers.{i}."
    return {
        ("embed_tokens",): prefix + "embed_tokens.weight",
        ("lm_head",): "lm_head.weight",
        ("norm", "scale"): prefix + "norm.weight",
        ("layers", "input_layernorm", "scale"): layer + "input_layernorm.weight",
        ("layers", "post_attention_layernorm", "scale"): layer + "post_attention_layernorm.weight",
        ("layers", "self_attn", "q_proj"): layer + "self_attn.q_proj.weight",
        ("layers", "self_attn", "k_proj"): layer + "self_attn.k_proj.weight",
        ("layers", "self_attn", "v_proj"): layer + "self_attn.v_proj.weight",
        ("layers", "self_attn", "o_proj"): layer + "self_attn.o_proj.weight",
        ("layers", "self_attn", "q_norm", "scale"): layer + "self_attn.q_norm.weight",
        ("layers", "self_attn", "k_norm", "scale"): layer + "self_attn.k_norm.weight",
        ("layers", "mlp", "gate_proj"): layer + "mlp.gate_proj.weight",
        ("layers", "mlp", "up_proj"): layer + "mlp.up_proj.weight",
        ("layers", "mlp", "down_proj"): layer + "mlp.down_proj.weight",
    }


_GGUF_NAMES: dict[Path, str] = {
    ("embed_tokens",): "token_embd.weight",
    ("lm_head",): "output.weight",
    ("norm", "scale"): "output_norm.weight",
    ("layers", "input_layernorm", "scale"): "blk.{i}.attn_norm.weight",
    ("layers", "post_attention_layernorm", "scale"): "blk.{i}.ffn_norm.weight",
    ("layers", "self_attn", "q_proj"): "blk.{i}.attn_q.weight",
    ("layers", "self_attn", "k_proj"): "blk.{i}.attn_k.weight",
    ("layers", "self_attn", "v_proj"): "blk.{i}.attn_v.weight",
    ("layers", "self_attn", "o_proj"): "blk.{i}.attn_output.weight",
    ("layers", "self_attn", "q_norm", "scale"): "blk.{i}.attn_q_norm.weight",
    ("layers", "self_attn", "k_norm", "scale"): "blk.{i}.attn_k_norm.weight",
    ("layers", "mlp", "gate_proj"): "blk.{i}.ffn_gate.weight",
    ("layers", "mlp", "up_proj"): "blk.{i}.ffn_up.weight",
    ("layers", "mlp", "down_proj"): "blk.{i}.ffn_down.weight",
}

# Stored (transformers-layout) shape and our n_in for each parameter.
def _layouts(c: ModelConfig) -> dict[Path, tuple[tuple[int, ...], int | None]]:
    h, n, k, d, i, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    return {
        ("embed_tokens",): ((v, h), None),
        ("lm_head",): ((v, h), 1),
        ("norm", "scale"): ((h,), None),
        ("layers", "input_layernorm", "scale"): ((h,), None),
        ("layers", "post_attention_layernorm", "scale"): ((h,), None),
        ("layers", "self_attn", "q_proj"): ((n * d, h), 1),
        ("layers", "self_attn", "k_proj"): ((k * d, h), 1),
        ("layers", "self_attn", "v_proj"): ((k * d, h), 1),
        ("layers", "self_attn", "o_proj"): ((h, n * d), 2),
        ("layers", "self_attn", "q_norm", "scale"): ((d,), None),
        ("layers", "self_attn", "k_norm", "scale"): ((d,), None),
        ("layers", "mlp", "gate_proj"): ((i, h), 1),
        ("layers", "mlp", "up_proj"): ((i, h), 1),
        ("layers", "mlp", "down_proj"): ((h, i), 1),
    }


def target_bindings(config: ModelConfig, abstract_params: Any, names: dict[Path, str]) -> list[Binding]:
    """One Binding per leaf of `abstract_params` (shapes from `jax.eval_shape` of init)."""
    layouts = _layouts(config)
    bindings = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path = tuple(k.key for k in key_path)
        stored_shape, n_in = layouts[path]
        stacked = path[0] == "layers"
        template = names[path]
        tensor_names = tuple(template.format(i=l) for l in range(config.num_layers)) if stacked else (template,)
        bindings.append(Binding(path, tensor_names, stored_shape, tuple(leaf.shape), n_in, stacked))
    return bindings


def hf_bindings(config: ModelConfig, abstract_params: Any, store: Store) -> list[Binding]:
    prefix = "model." if any(name.startswith("model.") for name in store) else ""
    return target_bindings(config, abstract_params, _hf_names(prefix))


def gguf_bindings(config: ModelConfig, abstract_params: Any) -> list[Binding]:
    return target_bindings(config, abstract_params, _GGUF_NAMES)


def check_store(bindings: Sequence[Binding], store: Store, source: str, ignorable: Sequence[str] = ()) -> None:
    """Raises one CheckpointError listing every missing, mis-shaped and unexpected tensor."""
    problems = []
    wanted = set()
    for b in bindings:
        for name in b.names:
            wanted.add(name)
            if name not in store:
                problems.append(f"missing tensor {name!r} (expected shape {b.stored_shape})")
            elif store[name].shape != b.stored_shape:
                problems.append(
                    f"tensor {name!r} in {store[name].file} has shape {store[name].shape}, "
                    f"expected {b.stored_shape}"
                )
    for name in sorted(set(store) - wanted - set(ignorable)):
        if not name.endswith("rotary_emb.inv_freq"):
            problems.append(f"unexpected tensor {name!r} in {store[name].file}")
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointError(f"{source}: {len(problems)} problem(s) with the checkpoint:\n  - {listing}")


def place(
    bindings: Sequence[Binding], store: Store, shardings: dict[Path, jax.sharding.Sharding], dtype
) -> dict[str, Any]:
    """Builds the params pytree; each device reads only the block its shard needs."""
    params: dict[str, Any] = {}
    for b in bindings:
        def read(index, b=b):
            return b.read(store, index).astype(dtype)

        array = jax.make_array_from_callback(b.shape, shardings[b.path], read)
        node = params
        for key in b.path[:-1]:
            node = node.setdefault(key, {})
        node[b.path[-1]] = array
    return params
