"""The entry point: block attention on the current backend, differentiable.

`implementation="pallas"` runs the Pallas kernels (forward, and the backward through a custom
VJP): on a GPU the Triton kernels of `gpu.py`, on a TPU the Mosaic kernels of `tpu.py`, and
`backend` picks one of them elsewhere, interpreted (slow; for tests: the TPU kernels on the TPU
interpreter, which raises on any read out of bounds). `"xla"` runs the jnp reference, which
builds every score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_attention import gpu, reference, tpu
from pallas_kernels.block_attention.tuning import pick_blocks

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "block_attention"]
TPU_INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise")


def block_attention(q: jax.Array, k_ctx: jax.Array, v_ctx: jax.Array, ctx_len: jax.Array, k_blk: jax.Array,
                    v_blk: jax.Array, keep: jax.Array, *, implementation: str = "pallas", scale: float | None = None,
                    blocks: gpu.Blocks | None = None, backend: str | None = None) -> jax.Array:
    """Attention of each block's slots over the context before its anchor and over its own block
    (`reference.block_attention` says what it computes). q: [B, A, G, N, D]; k_ctx, v_ctx:
    [B, K, S, D]; ctx_len: [B, A] int32; k_blk, v_blk: [B, A, G, K, D]; keep: [B, A] bool.
    Returns [B, A, G, N, D]. blocks: the GPU kernels' block sizes (default: `tuning.pick_blocks`);
    backend: "gpu" or "tpu", whose kernels run (default: the current backend's, the GPU's off
    both)."""
    if implementation == "xla":
        return reference.block_attention(q, k_ctx, v_ctx, ctx_len, k_blk, v_blk, keep, scale)
    if implementation != "pallas":
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    here = jax.default_backend()
    backend = backend or ("tpu" if here == "tpu" else "gpu")
    b, a, g, n, d = q.shape
    s = k_ctx.shape[2]
    slots = 1 << (g - 1).bit_length()
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend {backend!r} is not 'gpu' or 'tpu'")
    if backend == "tpu":  # the TPU kernels' fixed tiles
        if slots > tpu.BLOCK_Q:
            raise ValueError(f"blocks of {g} slots do not fit the TPU kernels' tiles of {tpu.BLOCK_Q} rows")
        blocks = gpu.Blocks(block_q=tpu.BLOCK_Q, block_k=tpu.BLOCK_K)
        run = (tpu, None if here == "tpu" else TPU_INTERPRET)
    else:
        blocks = blocks or pick_blocks(slots=slots, head_dim=d, itemsize=q.dtype.itemsize)
        run = (gpu, here != "gpu")
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
                  slots, blocks, d**-0.5 if scale is None else scale, run)
    return out.reshape(b, n, a_pad, slots, d)[:, :, :a, :g].transpose(0, 2, 3, 1, 4)


def _kernel_args(slots, blocks, scale, run):
    module, interpret = run
    static = dict(slots=slots, scale=scale, interpret=interpret)
    return module, static if module is tpu else {**static, "blocks": blocks}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attend(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots, blocks, scale, run):
    """The kernels on the row layout of `gpu.py`: out [B, N, rows, D]. run: (gpu or tpu module,
    its interpret argument)."""
    return _attend_forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots, blocks, scale, run)[0]


def _attend_forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, slots, blocks, scale, run):
    module, static = _kernel_args(slots, blocks, scale, run)
    out, lse = module.forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, **static)
    return out, (q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, out, lse)


def _attend_backward(slots, blocks, scale, run, residuals, d_out):
    module, static = _kernel_args(slots, blocks, scale, run)
    dq, dk, dv, dkb, dvb = module.backward(*residuals, d_out, **static)
    return dq, None, None, dk, dv, dkb, dvb


_attend.defvjp(_attend_forward, _attend_backward)
