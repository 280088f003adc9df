"""The entry point: fused speculative rejection sampling on the current backend.

`implementation="pallas"` runs the Pallas kernel: on a GPU compiled through Triton, on a TPU
compiled through Mosaic, elsewhere the GPU kernel in interpret mode (slow; for tests, which
run the TPU kernel on its interpreter too). `"xla"` runs the jnp reference.
"""

from __future__ import annotations

import jax

from pallas_kernels.rejection_sampling import gpu, reference, tpu

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "rejection_sample"]


def rejection_sample(logits: jax.Array, temperature: jax.Array, q: jax.Array, q_tokens: jax.Array,
                     draft_tokens: jax.Array, lengths: jax.Array, uniforms: jax.Array, gumbel: jax.Array, *,
                     implementation: str = "pallas", tile: int = 2048):
    """The accepted draft count [B] and the next token [B] of each row
    (`reference.rejection_sample` says what it computes). logits [B, G + 1, V]; temperature
    [B] (0: greedy); q [B, G, V] fp32; q_tokens [B, G]; draft_tokens [B, G]; lengths [B];
    uniforms [B, G]; gumbel [B, V]. tile: vocabulary entries per step of the GPU kernel (the
    TPU kernel keeps its own)."""
    if implementation == "xla":
        return reference.rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths, uniforms, gumbel)
    if implementation != "pallas":
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths, uniforms, gumbel)
    return gpu.rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths, uniforms, gumbel,
                                tile=tile, interpret=backend != "gpu")
