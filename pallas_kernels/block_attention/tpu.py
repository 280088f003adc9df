"""Block attention for TPUs: forward and backward Pallas kernels lowered through Mosaic.

The row layout, the algorithm and the three kernels are those of `gpu.py` (read it first); what
differs is how a TPU wants its blocks:
- per-row values live in [.., rows, 1] blocks (a column of sublanes) where they scale a
  [rows, keys] tile, and in [.., 1, rows] blocks (a row of lanes) where they scale its
  transpose, so nothing is transposed in the kernel;
- a program keeps its KV head's whole context in VMEM (the block pipeline fetches it once per
  head) and walks it `block_k` keys at a time;
- `backward_context` computes the transposed scores K Q^T [block_k, rows of a tile], so the
  log-sum-exp, delta and context lengths of the tile's queries broadcast along lanes; its grid
  is (sequence, KV head, key step, query head of the group), the last axis accumulating into
  the same dK/dV blocks, and the schedule of tiles comes in SMEM as scalar prefetch.
Tiles are 128 query rows (the lane width). VMEM holds, double-buffered, a KV head's context
keys and values (4 MB at 4096 positions x head dim 128 in bf16) and, in the context backward,
one query head's queries and output gradients (4 MB at 4096 rows): contexts much past 8192
positions would need the context walked from HBM instead. Checked on the TPU interpreter and
against Mosaic's lowering; not yet run on TPU hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import NEG
from pallas_kernels.block_attention.gpu import context_schedule

BLOCK_Q = 128  # query rows per tile: whole blocks, one lane width
BLOCK_K = 128  # context keys per step


def _dot(a, b, contract=(1, 1)):
    """a [m, k] . b: contract a's axis 1 with b's axis `contract[1]`, fp32 accumulation."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _own_blocks(slots: int) -> jax.Array:
    """[M, M] bool: row and column belong to the same block (lax.div: non-negative operands, no
    floor-division's sign fix-up, which Mosaic lowers per chip generation)."""
    block = lambda axis: lax.div(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, BLOCK_Q), axis), jnp.int32(slots))
    return block(0) == block(1)


def _online(carry, scores, visible, v):
    acc, peak, total = carry  # [M, D], [M, 1], [M, 1]
    scores = jnp.where(visible, scores, NEG)
    new_peak = jnp.maximum(peak, jnp.max(scores, axis=1, keepdims=True))
    probs = jnp.where(visible, jnp.exp(scores - new_peak), 0.0)
    rescale = jnp.exp(peak - new_peak)
    acc = acc * rescale + _dot(probs.astype(v.dtype), v, (1, 0))
    return acc, new_peak, total * rescale + jnp.sum(probs, axis=1, keepdims=True)


def _context_steps(ctx):
    return lax.div(jnp.max(ctx) + BLOCK_K - 1, jnp.int32(BLOCK_K))


def _forward_kernel(q_ref, ctx_ref, keep_ref, kc_ref, vc_ref, kb_ref, vb_ref, o_ref, lse_ref, *, slots, scale):
    """q_ref [M, D]; ctx_ref [M, 1]; keep_ref [1, M]; kc_ref, vc_ref [S, D]; kb_ref, vb_ref
    [M, D]; o_ref [M, D]; lse_ref [M, 1]."""
    q, ctx = q_ref[...], ctx_ref[...]
    d = q.shape[1]

    def body(j, carry):
        start = pl.multiple_of(j * BLOCK_K, BLOCK_K)
        k, v = kc_ref[pl.ds(start, BLOCK_K), :], vc_ref[pl.ds(start, BLOCK_K), :]
        visible = start + lax.broadcasted_iota(jnp.int32, (BLOCK_Q, BLOCK_K), 1) < ctx
        return _online(carry, _dot(q, k) * scale, visible, v)

    init = (jnp.zeros((BLOCK_Q, d), jnp.float32), jnp.full((BLOCK_Q, 1), NEG, jnp.float32),
            jnp.zeros((BLOCK_Q, 1), jnp.float32))
    carry = lax.fori_loop(0, _context_steps(ctx), body, init)
    visible = _own_blocks(slots) & (keep_ref[...] > 0)
    acc, peak, total = _online(carry, _dot(q, kb_ref[...]) * scale, visible, vb_ref[...])
    seen = total > 0
    o_ref[...] = (acc / jnp.where(seen, total, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), 0.0)


def _grad_scores(q, do, lse, delta, k, v, visible, scale):
    p = jnp.where(visible, jnp.exp(_dot(q, k) * scale - lse), 0.0)
    return p, p * (_dot(do, v) - delta)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, ctx_ref, keep_ref, kc_ref, vc_ref, kb_ref, vb_ref, dq_ref,
               dkb_ref, dvb_ref, *, slots, scale):
    """As `_forward_kernel`, with do_ref [M, D], lse_ref and delta_ref [M, 1]."""
    q, do, lse, delta, ctx = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], ctx_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * BLOCK_K, BLOCK_K)
        k, v = kc_ref[pl.ds(start, BLOCK_K), :], vc_ref[pl.ds(start, BLOCK_K), :]
        visible = start + lax.broadcasted_iota(jnp.int32, (BLOCK_Q, BLOCK_K), 1) < ctx
        _, ds = _grad_scores(q, do, lse, delta, k, v, visible, scale)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = lax.fori_loop(0, _context_steps(ctx), body, jnp.zeros(q.shape, jnp.float32))
    kb = kb_ref[...]
    visible = _own_blocks(slots) & (keep_ref[...] > 0)
    p, ds = _grad_scores(q, do, lse, delta, kb, vb_ref[...], visible, scale)
    dq_ref[...] = ((dq + _dot(ds.astype(kb.dtype), kb, (1, 0))) * scale).astype(dq_ref.dtype)
    dkb_ref[...] = _dot(ds.astype(q.dtype), q, (0, 0)) * scale
    dvb_ref[...] = _dot(p.astype(do.dtype), do, (0, 0))


def _dkv_kernel(tiles_ref, counts_ref, q_ref, do_ref, lse_ref, delta_ref, ctx_ref, kc_ref, vc_ref, dk_ref, dv_ref,
                *, scale):
    """tiles_ref [B, steps, T], counts_ref [B, steps] (SMEM); q_ref, do_ref [rows, D] of one query
    head; lse_ref, delta_ref, ctx_ref [1, rows]; kc_ref, vc_ref [block_k, D]; dk_ref, dv_ref
    [block_k, D], accumulated over the group's query heads (the last grid axis)."""
    b, step, head = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    k, v = kc_ref[...], vc_ref[...]
    slot = step * BLOCK_K + lax.broadcasted_iota(jnp.int32, (BLOCK_K, BLOCK_Q), 0)  # [block_k, M]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(tiles_ref[b, step, i] * BLOCK_Q, BLOCK_Q), BLOCK_Q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        visible = slot < ctx_ref[:, rows]
        p = jnp.where(visible, jnp.exp(_dot(k, q) * scale - lse_ref[:, rows]), 0.0)  # P^T [block_k, M]
        ds = p * (_dot(v, do) - delta_ref[:, rows])
        return dk + _dot(ds.astype(q.dtype), q, (1, 0)), dv + _dot(p.astype(do.dtype), do, (1, 0))

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, counts_ref[b, step], body, (zeros, zeros))

    @pl.when(head == 0)
    def _():
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)
        dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)

    dk_ref[...] += dk * scale
    dv_ref[...] += dv


@functools.partial(jax.jit, static_argnames=("slots", "scale", "interpret"))
def forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, *, slots: int, scale: float, interpret=False):
    """As `gpu.forward` (rows a multiple of BLOCK_Q, S of BLOCK_K)."""
    b, n, rows, d = q.shape
    kv_heads, s = k_ctx.shape[1], k_ctx.shape[2]
    group, m = n // kv_heads, BLOCK_Q
    tile = pl.BlockSpec((None, None, m, d), lambda i, h, t: (i, h, t, 0))
    context = pl.BlockSpec((None, None, s, d), lambda i, h, t: (i, lax.div(h, group), 0, 0))
    own = pl.BlockSpec((None, None, m, d), lambda i, h, t: (i, lax.div(h, group), t, 0))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, slots=slots, scale=scale),
        grid=(b, n, rows // m),
        in_specs=[tile, pl.BlockSpec((None, m, 1), lambda i, h, t: (i, t, 0)),
                  pl.BlockSpec((None, 1, m), lambda i, h, t: (i, 0, t)), context, context, own, own],
        out_specs=[tile, pl.BlockSpec((None, None, m, 1), lambda i, h, t: (i, h, t, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, rows, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="block_attention_forward",
    )(q, ctx[:, :, None], keep[:, None, :], k_ctx, v_ctx, k_blk, v_blk)
    return out, lse[..., 0]


@functools.partial(jax.jit, static_argnames=("slots", "scale", "interpret"))
def backward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, out, lse, d_out, *, slots: int, scale: float,
             interpret=False):
    """As `gpu.backward`."""
    b, n, rows, d = q.shape
    kv_heads, s = k_ctx.shape[1], k_ctx.shape[2]
    group, m = n // kv_heads, BLOCK_Q
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, N, rows]
    tile = pl.BlockSpec((None, None, m, d), lambda i, h, t: (i, h, t, 0))
    tile_column = pl.BlockSpec((None, None, m, 1), lambda i, h, t: (i, h, t, 0))
    context = pl.BlockSpec((None, None, s, d), lambda i, h, t: (i, lax.div(h, group), 0, 0))
    own = pl.BlockSpec((None, None, m, d), lambda i, h, t: (i, lax.div(h, group), t, 0))
    dq, dkb, dvb = pl.pallas_call(
        functools.partial(_dq_kernel, slots=slots, scale=scale),
        grid=(b, n, rows // m),
        in_specs=[tile, tile, tile_column, tile_column, pl.BlockSpec((None, m, 1), lambda i, h, t: (i, t, 0)),
                  pl.BlockSpec((None, 1, m), lambda i, h, t: (i, 0, t)), context, context, own, own],
        out_specs=[tile, tile, tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="block_attention_backward_queries",
    )(q, d_out, lse[..., None], delta[..., None], ctx[:, :, None], keep[:, None, :], k_ctx, v_ctx, k_blk, v_blk)
    sum_group = lambda x: jnp.sum(x.reshape(b, kv_heads, group, rows, d), axis=2).astype(k_blk.dtype)

    tiles, counts = context_schedule(ctx, m, BLOCK_K, s // BLOCK_K)
    head_rows = pl.BlockSpec((None, None, rows, d), lambda i, h, j, r, *_: (i, h * group + r, 0, 0))
    head_lanes = pl.BlockSpec((None, None, 1, rows), lambda i, h, j, r, *_: (i, h * group + r, 0, 0))
    keys = pl.BlockSpec((None, None, BLOCK_K, d), lambda i, h, j, r, *_: (i, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kv_heads, s // BLOCK_K, group),
            in_specs=[head_rows, head_rows, head_lanes, head_lanes,
                      pl.BlockSpec((None, 1, rows), lambda i, h, j, r, *_: (i, 0, 0)), keys, keys],
            out_specs=[keys, keys],
        ),
        out_shape=[jax.ShapeDtypeStruct(k_ctx.shape, jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_attention_backward_context",
    )(tiles, counts[..., 0], q, d_out, lse[:, :, None, :], delta[:, :, None, :], ctx[:, None, :], k_ctx, v_ctx)
    return dq, dk.astype(k_ctx.dtype), dv.astype(v_ctx.dtype), sum_group(dkb), sum_group(dvb)
