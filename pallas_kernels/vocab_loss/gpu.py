"""The chunk loss for GPUs: a Pallas kernel lowered through Triton.

Program i owns `rows` rows and walks their whole vocabulary in tiles of `tile` columns:
1. the running max and sum of exp of d and of y (online softmax), and d at the label;
2. with the L1 term's gradient (`l1_grad`): l1 = sum |p - q| and S = sum p sign(p - q), which
   the gradient needs before any of it is written;
3. the gradient, written tile by tile in the output dtype (and l1 summed here when pass 2 did
   not run).
So each logits row is read two or three times and the gradient written once, where XLA's
fusions of `reference.loss_and_grad` read them about ten times. Sums run in another order than
the reference's, so results agree to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._common import NEG


class Blocks(NamedTuple):
    rows: int  # rows per program (a power of two)
    tile: int  # vocabulary columns per step (a power of two)
    num_warps: int = 8


def _kernel(d_ref, y_ref, labels_ref, a_ref, b_ref, ce_ref, l1_ref, grad_ref, *, rows: int, tile: int, total: int,
            vocab: int, l1_grad: bool):
    """d_ref, y_ref [R, V] fp32; labels_ref [R] int32; a_ref, b_ref [R] fp32; outputs ce_ref,
    l1_ref [R] fp32 and grad_ref [R, V]."""
    r0 = pl.program_id(0) * rows
    row_ok = r0 + lax.broadcasted_iota(jnp.int32, (rows,), 0) < total
    label = pl_triton.load(labels_ref.at[pl.ds(r0, rows)], mask=row_ok, other=-1)
    a = pl_triton.load(a_ref.at[pl.ds(r0, rows)], mask=row_ok, other=0.0)
    b = pl_triton.load(b_ref.at[pl.ds(r0, rows)], mask=row_ok, other=0.0)
    lanes = lax.broadcasted_iota(jnp.int32, (rows, tile), 1)
    steps = pl.cdiv(vocab, tile)

    def block(step):  # (block index, columns [rows, tile], mask [rows, tile])
        columns = step * tile + lanes
        return (pl.ds(r0, rows), pl.ds(step * tile, tile)), columns, row_ok[:, None] & (columns < vocab)

    def load(ref, step):
        where, columns, mask = block(step)
        return pl_triton.load(ref.at[where], mask=mask, other=NEG), columns

    def softmax_stats(step, carry):
        peak_d, sum_d, peak_y, sum_y, at_label = carry
        d, columns = load(d_ref, step)
        y, _ = load(y_ref, step)
        new_d, new_y = jnp.maximum(peak_d, jnp.max(d, axis=1)), jnp.maximum(peak_y, jnp.max(y, axis=1))
        sum_d = sum_d * jnp.exp(peak_d - new_d) + jnp.sum(jnp.exp(d - new_d[:, None]), axis=1)
        sum_y = sum_y * jnp.exp(peak_y - new_y) + jnp.sum(jnp.exp(y - new_y[:, None]), axis=1)
        at_label = at_label + jnp.sum(jnp.where(columns == label[:, None], d, 0.0), axis=1)
        return new_d, sum_d, new_y, sum_y, at_label

    neg, zero = jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32)
    peak_d, sum_d, peak_y, sum_y, at_label = lax.fori_loop(0, steps, softmax_stats, (neg, zero, neg, zero, zero))
    lse_d, lse_y = peak_d + jnp.log(sum_d), peak_y + jnp.log(sum_y)

    def probs(step):  # p, q [rows, tile] (0 off the vocabulary), columns
        d, columns = load(d_ref, step)
        y, _ = load(y_ref, step)
        return jnp.exp(d - lse_d[:, None]), jnp.exp(y - lse_y[:, None]), columns

    def distance(step, carry):
        l1, s = carry
        p, q, _ = probs(step)
        return l1 + jnp.sum(jnp.abs(p - q), axis=1), s + jnp.sum(p * jnp.sign(p - q), axis=1)

    l1, s = lax.fori_loop(0, steps, distance, (zero, zero)) if l1_grad else (zero, zero)

    def gradient(step, l1):
        p, q, columns = probs(step)
        grad = a[:, None] * (p - (columns == label[:, None]).astype(jnp.float32))
        if l1_grad:
            grad = grad + b[:, None] * p * (jnp.sign(p - q) - s[:, None])
        where, _, mask = block(step)
        pl_triton.store(grad_ref.at[where], grad.astype(grad_ref.dtype), mask=mask)
        return l1 if l1_grad else l1 + jnp.sum(jnp.abs(p - q), axis=1)

    l1 = lax.fori_loop(0, steps, gradient, l1)
    pl_triton.store(ce_ref.at[pl.ds(r0, rows)], lse_d - at_label, mask=row_ok)
    pl_triton.store(l1_ref.at[pl.ds(r0, rows)], l1, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("out_dtype", "l1_grad", "blocks", "interpret"))
def loss_and_grad(d, y, labels, a, b, *, out_dtype, l1_grad: bool, blocks: Blocks, interpret: bool = False):
    """`reference.loss_and_grad` (the b terms of the gradient only with `l1_grad`)."""
    r, v = d.shape
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    row = jax.ShapeDtypeStruct((r,), jnp.float32)
    return pl.pallas_call(
        functools.partial(_kernel, rows=blocks.rows, tile=blocks.tile, total=r, vocab=v, l1_grad=l1_grad),
        grid=(pl.cdiv(r, blocks.rows),),
        in_specs=[whole((r, v)), whole((r, v)), whole((r,)), whole((r,)), whole((r,))],
        out_specs=[whole((r,)), whole((r,)), whole((r, v))],
        out_shape=[row, row, jax.ShapeDtypeStruct((r, v), out_dtype)],
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="vocab_loss",
    )(d, y, labels.astype(jnp.int32), a.astype(jnp.float32), b.astype(jnp.float32))
