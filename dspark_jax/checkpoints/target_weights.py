"""Binding decoder parameters to checkpoint tensors, checking them, and placing them on devices.

A `Binding` says where one parameter of `dspark_jax.models.transformer.Decoder` comes from:
the checkpoint tensor name, the shape that tensor must have, and how its layout maps to ours (Linear weights are [out, in] on disk and
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
    name: str  # checkpoint tensor name
    stored_shape: tuple[int, ...]  # shape the stored tensor must have
    shape: tuple[int, ...]  # our parameter's shape
    n_in: int | None = None  # None: same layout; k: Linear whose first k dims (ours) are its input

    def read(self, store: Store, index: tuple[slice, ...]) -> np.ndarray:
        """The block `param[index]` as a numpy array, in the stored dtype or float32."""
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape)]
        tensor, shape = store[self.name], self.shape
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

def _layouts(c: ModelConfig) -> dict[Path, tuple[tuple[int, ...], int | None]]:
    """Stored (transformers-layout) shape and our n_in for each generic parameter path."""
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
    """One Binding per leaf of `abstract_params` (shapes from `jax.eval_shape` of init).

    `names` maps generic paths (("layers", "mlp", "up_proj"), ...) to checkpoint name
    templates in which "{i}" stands for the layer number.
    """
    layouts = _layouts(config)
    bindings = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path = tuple(k.key for k in key_path)
        layer = None
        generic = path
        if path[0].startswith("layers_"):
            layer, generic = int(path[0].removeprefix("layers_")), ("layers",) + path[1:]
        stored_shape, n_in = layouts[generic]
        bindings.append(Binding(path, names[generic].format(i=layer), stored_shape, tuple(leaf.shape), n_in))
    return bindings


def hf_bindings(config: ModelConfig, abstract_params: Any, store: Store) -> list[Binding]:
    prefix = "model." if any(name.startswith("model.") for name in store) else ""
    return target_bindings(config, abstract_params, _hf_names(prefix))


def gguf_bindings(config: ModelConfig, abstract_params: Any) -> list[Binding]:
    return target_bindings(config, abstract_params, _GGUF_NAMES)


def check_store(bindings: Sequence[Binding], store: Store, source: str, ignorable: Sequence[str] = ()) -> None:
    """Raises one CheckpointError listing every missing, mis-shaped and unexpected tensor."""
    problems = []
    for b in bindings:
        if b.name not in store:
            problems.append(f"missing tensor {b.name!r} (expected shape {b.stored_shape})")
        elif store[b.name].shape != b.stored_shape:
            problems.append(
                f"tensor {b.name!r} in {store[b.name].file} has shape {store[b.name].shape}, "
                f"expected {b.stored_shape}"
            )
    for name in sorted(set(store) - {b.name for b in bindings} - set(ignorable)):
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
