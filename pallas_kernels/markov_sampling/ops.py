"""The entry point: one draft slot's fused sampling step on the current backend.

`implementation="pallas"` runs the Pallas kernel: on a GPU compiled through Triton (for the
Markov ranks `unsupported` does not name), elsewhere in interpret mode (slow; for tests).
`"xla"` runs the jnp reference. TPUs have no kernel here yet and are refused rather than
silently given the reference.
"""

from __future__ import annotations

import jax

from pallas_kernels.markov_sampling import gpu, reference
from pallas_kernels.markov_sampling.gpu import unsupported
from pallas_kernels.markov_sampling.tuning import pick_blocks

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "markov_sample", "unsupported"]


def markov_sample(base: jax.Array, temperature: jax.Array, gumbel: jax.Array, vec: jax.Array | None = None,
                  w2: jax.Array | None = None, *, implementation: str = "pallas", blocks: gpu.Blocks | None = None):
    """The draft distribution q [B, V] fp32 and the token [B] of each row
    (`reference.markov_sample` says what it computes). base [B, V]; temperature [B] (0:
    greedy); gumbel [B, V]; vec [B, R] and w2 [V, R] for a Markov bias (or neither). blocks:
    the kernel's block sizes (default: `tuning.pick_blocks`)."""
    if (vec is None) != (w2 is None):
        raise ValueError("markov_sample needs both vec and w2 for a Markov bias, or neither")
    if implementation == "xla":
        return reference.markov_sample(base, temperature, gumbel, vec, w2)
    if implementation != "pallas":
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if backend == "tpu":
        raise NotImplementedError("markov_sample has no TPU kernel yet; use implementation='xla'")
    rank = None if vec is None else vec.shape[-1]
    if backend == "gpu" and (why := unsupported(rank)):
        raise ValueError(f"the Markov sampling kernel cannot run here: {why}; use implementation='xla'")
    if blocks is None:
        blocks = pick_blocks(batch=base.shape[0], vocab=base.shape[1], bias=vec is not None)
    return gpu.markov_sample(base, temperature, gumbel, vec, w2, blocks=blocks, interpret=backend != "gpu")
