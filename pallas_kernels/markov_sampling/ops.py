"""The entry point: one draft slot's fused sampling step on the current backend.

`implementation="pallas"` runs the Pallas kernel: on a GPU compiled through Triton (for the
Markov ranks `unsupported` does not name), on a TPU compiled through Mosaic, elsewhere the GPU
kernel in interpret mode (slow; for tests, which run the TPU kernel on its interpreter too).
`"xla"` runs the jnp reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.markov_sampling import gpu, reference, tpu
from pallas_kernels.markov_sampling.gpu import unsupported
from pallas_kernels.markov_sampling.tuning import pick_blocks

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "markov_sample", "unsupported"]


def markov_sample(base: jax.Array, temperature: jax.Array, gumbel: jax.Array, vec: jax.Array | None = None,
                  w2: jax.Array | None = None, *, implementation: str = "pallas", blocks: gpu.Blocks | None = None):
    """The draft distribution q [B, V] fp32 and the token [B] of each row
    (`reference.markov_sample` says what it computes). base [B, V]; temperature [B] (0:
    greedy); gumbel [B, V]; vec [B, R] and w2 [V, R] for a Markov bias (or neither). blocks:
    the GPU kernel's block sizes (default: `tuning.pick_blocks`; the TPU kernel takes none)."""
    if (vec is None) != (w2 is None):
        raise ValueError("markov_sample needs both vec and w2 for a Markov bias, or neither")
    if implementation == "xla":
        return reference.markov_sample(base, temperature, gumbel, vec, w2)
    if implementation != "pallas":
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if backend == "tpu":
        return finish(temperature, *tpu.markov_sample(base, temperature, gumbel, vec, w2))
    rank = None if vec is None else vec.shape[-1]
    if backend == "gpu" and (why := unsupported(rank)):
        raise ValueError(f"the Markov sampling kernel cannot run here: {why}; use implementation='xla'")
    if blocks is None:
        blocks = pick_blocks(batch=base.shape[0], vocab=base.shape[1], bias=vec is not None)
    return finish(temperature, *gpu.markov_sample(base, temperature, gumbel, vec, w2, blocks=blocks,
                                                  interpret=backend != "gpu"))


def finish(temperature, zt, peak, total, arg, best, pick):
    """(q [B, V], token [B]) from a kernel's z / T [B, V] and its running values per split
    [splits, B] (max of z / T, sum of exp(z / T - max), first argmax, Gumbel-max score and
    index): the splits merged, first occurrences first (argmax takes the lowest split among
    equal maxima), then q = exp(z / T - max) / sum, or the one-hot of the first argmax at T = 0."""
    b, v = zt.shape
    peak_all = jnp.max(peak, axis=0)  # [B]
    total_all = jnp.sum(total * jnp.exp(peak - peak_all), axis=0)
    first_max = jnp.take_along_axis(arg, jnp.argmax(peak, axis=0)[None], axis=0)[0]
    token = jnp.take_along_axis(pick, jnp.argmax(best, axis=0)[None], axis=0)[0]
    greedy = temperature == 0
    columns = jax.lax.broadcasted_iota(jnp.int32, (b, v), 1)
    q = jnp.where(greedy[:, None], (columns == first_max[:, None]).astype(jnp.float32),
                  jnp.exp(zt - peak_all[:, None]) / total_all[:, None])
    return q, jnp.where(greedy, first_max, token).astype(jnp.int32)
