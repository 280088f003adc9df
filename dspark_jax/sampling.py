"""Sampling distributions: temperature, top-k and top-p applied to fp32 logits.

`probabilities` is the one definition of the distribution a token is drawn from. Speculative
decoding must use it for the target and the draft alike, and draw draft tokens from exactly
the array that enters the acceptance ratio.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """fp32 probabilities [..., V] after temperature, top-k and top-p (renormalised).

    Greedy parameters give the one-hot distribution of the argmax.
    """
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if params.top_p < 1.0:
        sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]  # descending
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # The smallest kept probability: tokens are kept while the mass before them is < top_p.
        kept = jnp.where(mass_before < params.top_p, sorted_probs, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        probs = jnp.where(probs >= threshold, probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return probs


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """int32 token ids [...] drawn from `probabilities(logits, params)`, one per row."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = probabilities(logits, params)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
