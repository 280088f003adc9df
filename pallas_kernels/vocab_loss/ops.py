"""The entry point: the chunk loss on the current backend.

`implementation="pallas"` runs the Pallas kernel: on a GPU compiled through Triton, elsewhere in
interpret mode (slow; for tests). There is no Mosaic (TPU) kernel: on a TPU, "pallas" runs the
jnp reference, whose passes XLA's TPU fusions already keep to few (the GPU's do not). `"xla"`
runs the jnp reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.vocab_loss import gpu, reference

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "loss_and_grad"]
BLOCKS = gpu.Blocks(rows=1, tile=2048, num_warps=4)  # fastest with the L1 gradient of those bench_vocab_loss.py tries (H100)


def loss_and_grad(d: jax.Array, y: jax.Array, labels: jax.Array, a: jax.Array, b: jax.Array, *, l1_grad: bool = True,
                  out_dtype=jnp.float32, implementation: str = "pallas", blocks: gpu.Blocks | None = None):
    """(ce [R], l1 [R], grad [R, V] in out_dtype) of `reference.loss_and_grad` for d, y [R, V]
    fp32, labels [R] int32 in [0, V) (others give undefined results) and weights a, b [R]. l1_grad=False promises that b is zero: the
    kernel then skips the pass the L1 term's gradient needs (l1 is still computed)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if implementation == "xla" or backend == "tpu":
        return reference.loss_and_grad(d, y, labels, a, b, out_dtype=out_dtype)
    return gpu.loss_and_grad(d, y, labels, a, b, out_dtype=out_dtype, l1_grad=l1_grad, blocks=blocks or BLOCKS,
                             interpret=backend != "gpu")
