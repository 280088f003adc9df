"""Layers shared by target and draft models: RMSNorm, RoPE, embedding, the LM head, gated MLP.

Attention lives in `dspark_jax.models.attention`. Numerics: normalisation and RoPE tables run
in fp32; matmuls run in the compute dtype. Every parameter carries logical axis names (see `dspark_jax.sharding`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.models.config import ModelConfig, RopeConfig

Dtype = jnp.dtype


def param_init(scale: float = 0.02):
    return nn.initializers.normal(stddev=scale)


def random_params(abstract, key: jax.Array, shardings=None):
    """Parameters for an abstract pytree (ShapeDtypeStructs) with the modules' initialisers:
    norm scales and Gemma4's layer scalars 1, biases 0, everything else N(0, 0.02).

    Leaves are drawn by small programs compiled once per (kind, shape, dtype, sharding), far
    cheaper than tracing a whole model's `init`; with `shardings` (a matching pytree) every
    leaf is created already sharded.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shardings = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    out = []
    for i, ((path, leaf), sharding) in enumerate(zip(leaves, shardings)):
        kind = {"scale": "ones", "layer_scalar": "ones", "bias": "zeros"}.get(path[-1].key, "normal")
        out.append(_creator(kind, tuple(leaf.shape), jnp.dtype(leaf.dtype), sharding)(jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _creator(kind: str, shape: tuple[int, ...], dtype, sharding):
    def create(key):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return jax.jit(create, out_shardings=sharding)


class RMSNorm(nn.Module):
    """y = w * cast(x * rsqrt(mean(x^2) + eps)), normalised in fp32 (HF Llama/Qwen3 order);
    without `use_scale` there is no w (Gemma4's value norm)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        if not self.use_scale:
            return normed
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        return normed * scale.astype(self.dtype)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin tables [..., head_dim] for integer positions [...] (rotate-half layout)."""
    inv_freq = jnp.asarray(rope.inv_freq(head_dim))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates heads x [..., N, D] by cos/sin [..., D] (in fp32, returned in x's dtype)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)


def embed_tokens(embed: jax.Array, tokens: jax.Array, config: ModelConfig, dtype) -> jax.Array:
    """Embeddings [..., H] of tokens [...] in `dtype`; Gemma4 multiplies them by sqrt(H)
    rounded to the table's dtype (62.0 for H = 3840 in bf16), as transformers does."""
    x = jnp.take(embed, tokens, axis=0)
    if config.gemma:
        x = x * jnp.asarray(config.hidden_size**0.5, embed.dtype)
    return x.astype(dtype)


def lm_logits(hidden: jax.Array, embed: jax.Array, lm_head: jax.Array | None, softcap: float | None = None
              ) -> jax.Array:
    """fp32 logits [..., V] of final-normed hidden [..., H]: hidden @ lm_head [H, V], or
    hidden @ embed.T [V, H] for tied embeddings (lm_head None); with `softcap` c (Gemma4's
    final_logit_softcapping) they become c * tanh(logits / c)."""
    hidden_dtype = hidden.dtype
    if lm_head is None:
        logits = jnp.einsum("...h,vh->...v", hidden, embed.astype(hidden_dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...h,hv->...v", hidden, lm_head.astype(hidden_dtype), preferred_element_type=jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


ACTIVATION_FUNCTIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act is silu (SwiGLU) or tanh-approximated gelu (Gemma4)."""

    hidden_size: int
    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, i = self.hidden_size, self.intermediate_size
        init = nn.with_logical_partitioning(param_init(), ("embed", "mlp"))
        w_gate = self.param("gate_proj", init, (h, i), self.param_dtype).astype(self.dtype)
        w_up = self.param("up_proj", init, (h, i), self.param_dtype).astype(self.dtype)
        w_down = self.param(
            "down_proj", nn.with_logical_partitioning(param_init(), ("mlp", "embed")), (i, h), self.param_dtype
        ).astype(self.dtype)
        gate = jnp.einsum("...h,hi->...i", x, w_gate)  # [..., I]
        up = jnp.einsum("...h,hi->...i", x, w_up)  # [..., I]
        return jnp.einsum("...i,ih->...h", ACTIVATION_FUNCTIONS[self.activation](gate) * up, w_down)  # [..., H]
