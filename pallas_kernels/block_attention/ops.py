"""The entry point: block attention on the current backend, differentiable.

`implementation="pallas"` runs the Pallas kernels (forward, and the backward through a custom
VJP): on a GPU compiled through Triton, elsewhere in interpret mode (slow; for tests). There is
no TPU kernel yet, and asking for one on a TPU is refused. `"xla"` runs the jnp reference, which
builds every score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention import gpu, reference
from pallas_kernels.block_attention.tuning import pick_blocks

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "block_attention"]


def block_attention(q: jax.Array, k_ctx: jax.Array, v_ctx: jax.Array, ctx_len: jax.Array, k_blk: jax.Array,
                    v_blk: jax.Array, keep: jax.Array, *, implementation: str = "pallas", scale: float | None = None,
                    blocks: gpu.Blocks | None = None) -> jax.Array:
    """Attention of each block's slots over the context before its anchor and over its own block
    (`reference.block_attention` says what it computes). q: [B, A, G, N, D]; k_ctx, v_ctx:
    [B, K, S, D]; ctx_len: [B, A] int32; k_blk, v_blk: [B, A, G, K, D]; keep: [B, A] bool.
    Returns [B, A, G, N, D]. blocks: the GPU kernels' block sizes (default: `tuning.pick_blocks`)."""
    if implementation == "xla":
        return reference.block_attention(q, k_ctx, v_ctx, ctx_len, k_blk, v_blk, keep, scale)
    if implementation != "pallas":
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if backend == "tpu":
        raise ValueError("the block attention kernels have no TPU version yet; use implementation='xla'")
    b, a, g, n, d = q.shape
    s = k_ctx.shape[2]
    slots = 1 << (g - 1).bit_length()
    if blocks is None:
        blocks = pick_blocks(slots=slots, head_dim=d)
    a_pad = -(-a // (blocks.block_q // slots)) * (blocks.block_q // slots)

    def rows(x):  # [B, A, G, H, D] -> [B, H, A_pad * slots, D], row a * slots + j
        x = jnp.pad(x, ((0, 0), (0, a_pad - a), (0, slots - g), (0, 0), (0, 0)))
        return x.transpose(0, 3, 1, 2, 4).reshape(b, x.shape[3], a_pad * slots, d)

    ctx = jnp.pad(jnp.minimum(jnp.where(keep, ctx_len, 0), s).astype(jnp.int32), ((0, 0), (0, a_pad - a)))
    ctx = jnp.repeat(ctx, slots, axis=1)  # [B, rows] context slots each row sees
    real = keep[:, :, None] & (jnp.arange(slots) < g)[None, None, :]  # [B, A, slots]
    key_keep = jnp.pad(real, ((0, 0), (0, a_pad - a), (0, 0))).reshape(b, a_pad * slots).astype(jnp.int32)
    steps = ((0, 0), (0, 0), (0, -s % blocks.block_k), (0, 0))  # whole steps of context keys
    out = _attend(rows(q), ctx, key_keep, jnp.pad(k_ctx, steps), jnp.pad(v_ctx, steps), rows(k_blk), rows(v_blk),
                  slots, blocks, d**-0.5 if scale is None else scale, backend != "gpu")
    return out.reshape(b, n, a_pad, slots, d)[:, :, :a, :g].transpose(0, 2, 3, 1, 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attend(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots, blocks, scale, interpret):
    """The kernels on the row layout of `gpu.py`: out [B, N, rows, D]."""
    return gpu.forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots=slots, blocks=blocks, scale=scale,
                       interpret=interpret)[0]


def _attend_forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots, blocks, scale, interpret):
    out, lse = gpu.forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots=slots, blocks=blocks, scale=scale,
                           interpret=interpret)
    return out, (q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, out, lse)


def _attend_backward(slots, blocks, scale, interpret, residuals, d_out):
    q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, out, lse = residuals
    dq, dk, dv, dkb, dvb = gpu.backward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, out, lse, d_out, slots=slots,
                                        blocks=blocks, scale=scale, interpret=interpret)
    return dq, None, None, dk, dv, dkb, dvb


_attend.defvjp(_attend_forward, _attend_backward)
