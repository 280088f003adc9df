"""Block attention for GPUs: forward and backward Pallas kernels lowered through Triton.

Row layout (made by `ops.py`): a block's G slots are padded to `slots` rows (a power of two), so
head n's queries are [B, N, A * slots, D] with row i = a * slots + j; the blocks' own keys and
values are [B, K, A * slots, D] the same way, and the context's [B, K, S, D] (S padded to whole
steps). Per row, `ctx` holds the context slots it sees (0 for a dropped block) and, per key
row, `keep` is 1 for a real slot of a kept block. A query tile is `block_q` rows: whole blocks.

- `forward`, one program per (sequence, query head, query tile): it walks the context `block_k`
  keys at a time up to the tile's largest `ctx`, then takes the tile's own [block_q, block_q]
  block-diagonal scores, with an online softmax in fp32. It writes the output and each row's
  log-sum-exp. Tiles are launched last first: anchors ascend, so the last tiles see the most
  context, and starting them first keeps the longest programs off the end of the launch.
- `backward_queries`, the same grid: it recomputes each step's probabilities from the
  log-sum-exp and accumulates dQ; from the block-diagonal step it also writes the gradients of
  the blocks' own keys and values for this query head (summed over a group in XLA).
- `backward_context`, one program per (sequence, query head, `block_k` context keys): it takes
  only the query tiles that see these keys (a schedule made in XLA: tiles whose largest `ctx`
  passes the keys' first slot) and accumulates this query head's share of dK and dV, summed over
  the group in XLA. (One program per KV head walking all of its group's heads would do 4x the
  steps in its longest program for GQA 4: the first keys are seen by every tile, and that one
  program would set the kernel's time.)

Scores are never written to memory; the backward is FlashAttention-2's (dS = P (dP - delta),
delta = rowsum(dO * O)). Triton's rules apply (power-of-two blocks, `dot` on at least 16 x 16);
off a GPU the kernels run in interpret mode, which checks their logic but not those rules.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._common import NEG


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sizes and launch settings (`tuning.py` picks them)."""

    block_q: int  # query rows per program: whole blocks of `slots` rows, a power of two >= 16
    block_k: int  # context keys per inner step (a power of two >= 16)
    num_warps: int = 4
    num_stages: int = 2


def _dot(a, b, **kw):
    return pl_triton.dot(a, b, allow_tf32=False, **kw)


def _own_blocks(block_q: int, slots: int) -> jax.Array:
    """[block_q, block_q] bool: row and column belong to the same block."""
    rows = lax.broadcasted_iota(jnp.int32, (block_q, block_q), 0) // slots
    return rows == lax.broadcasted_iota(jnp.int32, (block_q, block_q), 1) // slots


def _online(carry, scores, visible, v):
    """One step of the online softmax: carry (acc [M, D], peak [M], total [M]) fp32."""
    acc, peak, total = carry
    scores = jnp.where(visible, scores, NEG)
    new_peak = jnp.maximum(peak, jnp.max(scores, axis=1))
    probs = jnp.where(visible, jnp.exp(scores - new_peak[:, None]), 0.0)
    rescale = jnp.exp(peak - new_peak)
    acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v)
    return acc, new_peak, total * rescale + jnp.sum(probs, axis=1)


def _forward_kernel(q_ref, ctx_ref, keep_ref, kc_ref, vc_ref, kb_ref, vb_ref, o_ref, lse_ref, *, slots: int,
                    block_k: int, scale: float):
    """q_ref [M, D] one query head's tile; ctx_ref, keep_ref [M]; kc_ref, vc_ref [S, D] its KV
    head's context; kb_ref, vb_ref [M, D] the tile's own block keys; o_ref [M, D]; lse_ref [M]."""
    q = q_ref[...]
    ctx = ctx_ref[...]
    block_q, d = q.shape

    def body(j, carry):
        k = kc_ref[pl.ds(j * block_k, block_k), :]  # [block_k, D]
        v = vc_ref[pl.ds(j * block_k, block_k), :]
        scores = _dot(q, k, trans_b=True) * scale  # [M, block_k] fp32
        visible = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1) < ctx[:, None]
        return _online(carry, scores, visible, v)

    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, pl.cdiv(jnp.max(ctx), block_k), body, init)
    scores = _dot(q, kb_ref[...], trans_b=True) * scale  # [M, M]
    visible = _own_blocks(block_q, slots) & (keep_ref[...][None, :] > 0)
    acc, peak, total = _online(carry, scores, visible, vb_ref[...])
    seen = total > 0
    o_ref[...] = (acc / jnp.where(seen, total, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), 0.0)  # unseen: never used


def _grad_scores(q, do, lse, delta, k, v, visible, scale):
    """Recomputed probabilities P and dS = P (dP - delta) of one step: [M, keys] fp32."""
    scores = _dot(q, k, trans_b=True) * scale
    p = jnp.where(visible, jnp.exp(scores - lse[:, None]), 0.0)
    return p, p * (_dot(do, v, trans_b=True) - delta[:, None])


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, ctx_ref, keep_ref, kc_ref, vc_ref, kb_ref, vb_ref, dq_ref,
               dkb_ref, dvb_ref, *, slots: int, block_k: int, scale: float):
    """As `_forward_kernel`'s tile, with do_ref [M, D], lse_ref and delta_ref [M]; writes dq_ref,
    and this query head's share of the own-block key and value gradients dkb_ref, dvb_ref [M, D]."""
    q, do, lse, delta, ctx = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], ctx_ref[...]
    block_q, d = q.shape

    def body(j, dq):
        k = kc_ref[pl.ds(j * block_k, block_k), :]
        v = vc_ref[pl.ds(j * block_k, block_k), :]
        visible = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1) < ctx[:, None]
        _, ds = _grad_scores(q, do, lse, delta, k, v, visible, scale)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, pl.cdiv(jnp.max(ctx), block_k), body, jnp.zeros((block_q, d), jnp.float32))
    kb = kb_ref[...]
    visible = _own_blocks(block_q, slots) & (keep_ref[...][None, :] > 0)
    p, ds = _grad_scores(q, do, lse, delta, kb, vb_ref[...], visible, scale)
    dq_ref[...] = ((dq + _dot(ds.astype(kb.dtype), kb)) * scale).astype(dq_ref.dtype)
    dkb_ref[...] = _dot(ds.astype(q.dtype), q, trans_a=True) * scale
    dvb_ref[...] = _dot(p.astype(do.dtype), do, trans_a=True)


def _dkv_kernel(tiles_ref, count_ref, q_ref, do_ref, lse_ref, delta_ref, ctx_ref, kc_ref, vc_ref, dk_ref, dv_ref,
                *, block_q: int, scale: float):
    """tiles_ref [T]: the query tiles that see this step's keys first, count_ref [1] how many;
    q_ref, do_ref [rows, D] and lse_ref, delta_ref [rows] one query head's; ctx_ref [rows];
    kc_ref, vc_ref [block_k, D] this program's context keys of that head's KV head; dk_ref,
    dv_ref [block_k, D] fp32 this query head's share of their gradients."""
    k, v = kc_ref[...], vc_ref[...]
    block_k, d = k.shape
    first = pl.program_id(2) * block_k

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(tiles_ref[i] * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        visible = first + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1) < ctx_ref[rows][:, None]
        p, ds = _grad_scores(q, do, lse_ref[rows], delta_ref[rows], k, v, visible, scale)
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv + _dot(p.astype(do.dtype), do, trans_a=True)

    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(0, count_ref[0], body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _tile_specs(rows: int, m: int, s: int, d: int, group: int):
    """BlockSpecs of the (sequence, query head, query tile) grid, the last tile first: a tile's
    [m, D] rows of a head, its [m] per-head values, its [m] per-row values, its KV head's whole
    [S, D] context, and the tile's own-block [m, D] keys or values of that KV head."""
    last = rows // m - 1
    tile = pl.BlockSpec((None, None, m, d), lambda i, h, t: (i, h, last - t, 0))
    tile_row = pl.BlockSpec((None, None, m), lambda i, h, t: (i, h, last - t))
    per_row = pl.BlockSpec((None, m), lambda i, h, t: (i, last - t))
    context = pl.BlockSpec((None, None, s, d), lambda i, h, t: (i, h // group, 0, 0))
    own = pl.BlockSpec((None, None, m, d), lambda i, h, t: (i, h // group, last - t, 0))
    return tile, tile_row, per_row, context, own


def _params(blocks: Blocks):
    return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


@functools.partial(jax.jit, static_argnames=("slots", "blocks", "scale", "interpret"))
def forward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, *, slots: int, blocks: Blocks, scale: float,
            interpret: bool = False):
    """q [B, N, rows, D]; ctx, keep [B, rows] int32; k_ctx, v_ctx [B, K, S, D] (S a multiple of
    block_k); k_blk, v_blk [B, K, rows, D]. Returns (out [B, N, rows, D], lse [B, N, rows] fp32)."""
    b, n, rows, d = q.shape
    kv_heads, s = k_ctx.shape[1], k_ctx.shape[2]
    group, m = n // kv_heads, blocks.block_q
    tile, tile_row, per_row, context, own = _tile_specs(rows, m, s, d, group)
    kernel = functools.partial(_forward_kernel, slots=slots, block_k=blocks.block_k, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(b, n, rows // m),
        in_specs=[tile, per_row, per_row, context, context, own, own],
        out_specs=[tile, tile_row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, rows), jnp.float32)],
        compiler_params=_params(blocks),
        interpret=interpret,
        name="block_attention_forward",
    )(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk)


def context_schedule(ctx: jax.Array, block_q: int, block_k: int, steps: int) -> tuple[jax.Array, jax.Array]:
    """For each `block_k` keys of the context, the query tiles that see any of them, first
    (tiles [B, steps, T] int32), and how many do (counts [B, steps, 1] int32)."""
    b, rows = ctx.shape
    reach = jnp.max(ctx.reshape(b, rows // block_q, block_q), axis=2)  # [B, T] context slots a tile sees
    sees = reach[:, None, :] > (jnp.arange(steps, dtype=jnp.int32) * block_k)[None, :, None]  # [B, steps, T]
    tiles = jnp.argsort(~sees, axis=2, stable=True).astype(jnp.int32)
    return tiles, jnp.sum(sees, axis=2, dtype=jnp.int32)[..., None]


@functools.partial(jax.jit, static_argnames=("slots", "blocks", "scale", "interpret"))
def backward(q, ctx, keep, k_ctx, v_ctx, k_blk, v_blk, out, lse, d_out, *, slots: int, blocks: Blocks,
             scale: float, interpret: bool = False):
    """Gradients of `forward` for the output cotangent d_out [B, N, rows, D]: (dq, dk_ctx, dv_ctx,
    dk_blk, dv_blk) in the shapes and dtypes of q, k_ctx, v_ctx, k_blk and v_blk."""
    b, n, rows, d = q.shape
    kv_heads, s = k_ctx.shape[1], k_ctx.shape[2]
    group, m, bk = n // kv_heads, blocks.block_q, blocks.block_k
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, N, rows]
    tile, tile_row, per_row, context, own = _tile_specs(rows, m, s, d, group)
    dq, dkb, dvb = pl.pallas_call(
        functools.partial(_dq_kernel, slots=slots, block_k=bk, scale=scale),
        grid=(b, n, rows // m),
        in_specs=[tile, tile, tile_row, tile_row, per_row, per_row, context, context, own, own],
        out_specs=[tile, tile, tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        compiler_params=_params(blocks),
        interpret=interpret,
        name="block_attention_backward_queries",
    )(q, d_out, lse, delta, ctx, keep, k_ctx, v_ctx, k_blk, v_blk)

    tiles, counts = context_schedule(ctx, m, bk, s // bk)
    head = pl.BlockSpec((None, None, rows, d), lambda i, h, j: (i, h, 0, 0))
    head_row = pl.BlockSpec((None, None, rows), lambda i, h, j: (i, h, 0))
    keys = pl.BlockSpec((None, None, bk, d), lambda i, h, j: (i, h // group, j, 0))
    head_keys = pl.BlockSpec((None, None, bk, d), lambda i, h, j: (i, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=m, scale=scale),
        grid=(b, n, s // bk),
        in_specs=[pl.BlockSpec((None, None, rows // m), lambda i, h, j: (i, j, 0)),
                  pl.BlockSpec((None, None, 1), lambda i, h, j: (i, j, 0)),
                  head, head, head_row, head_row, pl.BlockSpec((None, rows), lambda i, h, j: (i, 0)), keys, keys],
        out_specs=[head_keys, head_keys],
        out_shape=[jax.ShapeDtypeStruct((b, n, s, d), jnp.float32)] * 2,
        compiler_params=_params(blocks),
        interpret=interpret,
        name="block_attention_backward_context",
    )(tiles, counts, q, d_out, lse, delta, ctx, k_ctx, v_ctx)
    sum_group = lambda x, like: jnp.sum(x.reshape((b, kv_heads, group) + x.shape[2:]), axis=2).astype(like.dtype)
    return dq, sum_group(dk, k_ctx), sum_group(dv, v_ctx), sum_group(dkb, k_blk), sum_group(dvb, v_blk)
