"""Sampling: per-row parameters, the one distribution every token is drawn from, and the draw.

`probabilities` is the one definition of the distribution a token is drawn from. Targets,
drafters and rejection sampling all use it, and a draft token is drawn from exactly the array
that enters the acceptance ratio.

Parameters are per row: each field of `SamplingParams` is a scalar (one value for every row)
or an array whose shape is a prefix of the logits' row dimensions ([B] against logits
[B, V] or [B, G, V]). They are traced values, so a new temperature never recompiles; only
`filtered` (whether any row uses top-k or top-p, which costs a sort over the vocabulary) is
static.

Randomness is per row too: `row_keys(keys, positions)` derives a row's key for one step from
its request's key and the position of the first token the step produces, so a request's draws
do not depend on which other requests share its batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters.

    Each field is a number or a per-row array (see the module docstring). `filtered` is
    derived from the values unless given: False compiles no top-k/top-p code at all.
    """

    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0
    filtered: bool | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        for name in _RULES:
            if _on_host(getattr(self, name)):  # device arrays were checked where they were made
                _check(name, getattr(self, name))
        if self.filtered is None:
            if not (_concrete(self.top_k) and _concrete(self.top_p)):
                raise ValueError("SamplingParams of traced values needs `filtered` given explicitly")
            filtered = bool(np.any(np.asarray(self.top_k) > 0) or np.any(np.asarray(self.top_p) < 1))
            object.__setattr__(self, "filtered", filtered)

    @classmethod
    def rows(cls, n: int, *, temperature=1.0, top_k=0, top_p=1.0, pad_to: int | None = None) -> "SamplingParams":
        """Per-row arrays [pad_to or n] from scalars or sequences of n values (padding rows are
        greedy and unfiltered)."""
        width = n if pad_to is None else pad_to
        values = {}
        for name, value, dtype, pad in (("temperature", temperature, np.float32, 0.0), ("top_k", top_k, np.int32, 0),
                                        ("top_p", top_p, np.float32, 1.0)):
            if np.ndim(value) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} values for {n} prompts")
            _check(name, value)
            column = np.full((width,), pad, dtype)
            column[:n] = value
            values[name] = column
        return cls(**values)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _on_host(x) -> bool:
    """A value checking costs no device transfer for: anything but a device array, a tracer or
    a shaped placeholder of ahead-of-time lowering (which has a shape and dtype and is not
    numpy)."""
    shaped = hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (np.ndarray, np.generic))
    return not (isinstance(x, jax.Array) or shaped)


# field -> (allowed dtype kinds, predicate, what a valid value is)
_RULES = {
    "temperature": ("iuf", lambda t: t >= 0, "a number >= 0"),
    "top_k": ("iu", lambda k: k >= 0, "an integer >= 0"),
    "top_p": ("iuf", lambda p: (0 < p) & (p <= 1), "in (0, 1]"),
}


def _check(name: str, value) -> None:
    """Raises a ValueError naming the field (and the first bad row of per-row values) unless
    every value is valid."""
    kinds, ok, what = _RULES[name]
    values = np.asarray(value)
    if values.dtype.kind not in kinds:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    flat = values.reshape(-1)
    bad = np.flatnonzero(~ok(flat))
    if bad.size:
        label = name if values.ndim == 0 else f"{name}[{bad[0]}]"
        raise ValueError(f"{label} must be {what}, got {flat[bad[0]].item()!r}")


def _per_row(value, logits: jax.Array, dtype) -> jax.Array:
    """A scalar or per-row array shaped to broadcast against logits [..., V]."""
    value = jnp.asarray(value, dtype)
    return value.reshape(value.shape + (1,) * (logits.ndim - value.ndim))


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """fp32 probabilities [..., V] after temperature, top-k and top-p (renormalised), per row.

    Greedy rows (temperature 0) get the one-hot distribution of the argmax.
    """
    logits = logits.astype(jnp.float32)
    temperature = _per_row(params.temperature, logits, jnp.float32)  # [..., 1]
    greedy = temperature == 0
    z = logits / jnp.where(greedy, 1.0, temperature)
    if params.filtered:
        top_k = _per_row(params.top_k, logits, jnp.int32)
        top_p = _per_row(params.top_p, logits, jnp.float32)
        vocab = z.shape[-1]
        order = jnp.argsort(-z, axis=-1)  # [..., V] token ids by descending logit
        kth = jnp.take_along_axis(z, jnp.take_along_axis(order, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1), axis=-1)
        z = jnp.where((top_k > 0) & (z < kth), -jnp.inf, z)
        probs = jax.nn.softmax(z, axis=-1)
        ranked = jnp.take_along_axis(probs, order, axis=-1)  # descending
        mass_before = jnp.cumsum(ranked, axis=-1) - ranked
        # The smallest kept probability: tokens are kept while the mass before them is < top_p.
        threshold = jnp.min(jnp.where(mass_before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        probs = jnp.where((top_p < 1) & (probs < threshold), 0.0, probs)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    else:
        probs = jax.nn.softmax(z, axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy, one_hot, probs)


def draw(key: jax.Array, probs: jax.Array) -> jax.Array:
    """int32 tokens [...] drawn from probs [..., V].

    key: one key for all rows, or one key per row (shape [...]). A one-hot row (greedy) always
    gives its argmax: log(0) = -inf never wins the Gumbel-max draw.
    """
    logp = jnp.log(probs)
    if key.shape == ():
        return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
    flat = jax.vmap(jax.random.categorical)(key.reshape(-1), logp.reshape(-1, logp.shape[-1]))
    return flat.reshape(key.shape).astype(jnp.int32)


def gumbel(keys: jax.Array, vocab: int) -> jax.Array:
    """The standard Gumbel noise [..., V] that `draw` adds to log-probabilities with per-row keys
    [...] (argmax_v log p_v + g_v is its token): for kernels that take the noise as input."""
    flat = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys.reshape(-1))
    return flat.reshape(keys.shape + (vocab,))


def row_temperatures(params: SamplingParams, logits: jax.Array) -> jax.Array:
    """Each row's temperature [...] fp32 for logits [..., V]."""
    return jnp.broadcast_to(_per_row(params.temperature, logits, jnp.float32)[..., 0], logits.shape[:-1])


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """int32 token ids [...] drawn from `probabilities(logits, params)`."""
    return draw(key, probabilities(logits, params))


def row_keys(keys: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-row keys [B] for one step: each request's key [B] folded with a position [B]."""
    return jax.vmap(jax.random.fold_in)(keys, positions)


def fold(keys: jax.Array, data: int) -> jax.Array:
    """Each key of keys [...] folded with the same integer (independent streams per purpose)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys.reshape(-1)).reshape(keys.shape)


def split(keys: jax.Array, num: int) -> jax.Array:
    """keys [...] -> [..., num]: `num` independent keys per key."""
    return jax.vmap(lambda k: jax.random.split(k, num))(keys.reshape(-1)).reshape(keys.shape + (num,))
