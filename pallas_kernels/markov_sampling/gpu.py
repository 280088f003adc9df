"""One draft slot's sampling step for GPUs: a Pallas kernel lowered through Triton.

Program (i, s) owns `rows` rows and the s-th of `splits` contiguous ranges of the vocabulary,
which it walks in tiles of `tile` columns. Per tile it forms the logits z = base + vec W2^T
(the Markov bias as a [rows, R] x [R, tile] product on the tensor cores, W2's tile read once
for all its rows), divides by the row's temperature, writes z / T, and folds the tile into
four running values per row: the max of z / T and its first index, the sum of exp(z / T - max),
and the Gumbel-max argmax of z / T + g. So the logits and the noise are each read once, W2 once
per row block, and nothing of width V is written but z / T.

`ops.finish` then merges the splits' running values (a [splits, B] reduction) and writes
q = exp(z / T - max) / sum (the one-hot of the first argmax at T = 0): one elementwise pass.
`reference.markov_sample` is the definition; the kernel's sums and products run in another
order, so a comparison that ties to the last bit can differ (measure zero for random inputs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._common import NEG, first_max



class Blocks(NamedTuple):
    rows: int  # rows per program (a power of two; at least 16 with a bias, for the tensor-core product)
    tile: int  # vocabulary columns per step (a power of two)
    splits: int  # programs per row block, each over a contiguous range of whole tiles
    num_warps: int = 4


def unsupported(rank: int | None) -> str | None:
    """Why the compiled kernel cannot take a Markov rank (None: it can)."""
    if rank is not None and (rank < 16 or rank & (rank - 1)):
        return f"Markov rank {rank} is not a power of two >= 16 (the tensor-core product's width)"
    return None


def _kernel(base_ref, temp_ref, noise_ref, *refs, rows: int, tile: int, steps: int, batch: int, vocab: int,
            bias: bool):
    """base_ref, noise_ref [B, V]; temp_ref [B]; with a bias vec_ref [B, R] and w2_ref [V, R];
    outputs zt_ref [B, V] and per-split running values [B] each (this split's row of
    [splits, B])."""
    if bias:
        vec_ref, w2_ref, *refs = refs
    zt_ref, peak_ref, total_ref, arg_ref, best_ref, pick_ref = refs
    r0 = pl.program_id(0) * rows
    first_col = pl.program_id(1) * steps * tile
    row_ok = r0 + lax.broadcasted_iota(jnp.int32, (rows,), 0) < batch
    temperature = pl_triton.load(temp_ref.at[pl.ds(r0, rows)], mask=row_ok, other=1.0)
    divisor = jnp.where(temperature == 0, 1.0, temperature)[:, None]
    if bias:
        vec = pl_triton.load(vec_ref.at[pl.ds(r0, rows), :], mask=row_ok[:, None], other=0.0)  # [rows, R]
    lanes = lax.broadcasted_iota(jnp.int32, (tile,), 0)

    def body(step, carry):
        peak, total, arg, best, pick = carry  # [rows] each
        c0 = first_col + step * tile
        col_ok = c0 + lanes < vocab
        mask = row_ok[:, None] & col_ok[None, :]
        block = (pl.ds(r0, rows), pl.ds(c0, tile))
        z = pl_triton.load(base_ref.at[block], mask=mask, other=0.0).astype(jnp.float32)  # [rows, tile]
        if bias:
            w = pl_triton.load(w2_ref.at[pl.ds(c0, tile), :], mask=col_ok[:, None], other=0.0)  # [tile, R]
            z = z + pl_triton.dot(vec, w, trans_b=True, allow_tf32=False)
        zt = z / divisor
        pl_triton.store(zt_ref.at[block], zt, mask=mask)
        zt = jnp.where(col_ok[None, :], zt, NEG)
        tile_peak, tile_arg = first_max(zt, c0, keepdims=False)
        new_peak = jnp.maximum(peak, tile_peak)
        scaled = jnp.where(col_ok[None, :], jnp.exp(zt - new_peak[:, None]), 0.0)
        total = total * jnp.exp(peak - new_peak) + jnp.sum(scaled, axis=1)
        arg = jnp.where(tile_peak > peak, tile_arg, arg)
        g = pl_triton.load(noise_ref.at[block], mask=mask, other=0.0)
        tile_best, tile_pick = first_max(jnp.where(col_ok[None, :], zt + g, NEG), c0, keepdims=False)
        pick = jnp.where(tile_best > best, tile_pick, pick)
        return new_peak, total, arg, jnp.maximum(best, tile_best), pick

    neg = jnp.full((rows,), NEG, jnp.float32)
    zero = jnp.zeros((rows,), jnp.int32)
    carry = lax.fori_loop(0, steps, body, (neg, jnp.zeros((rows,), jnp.float32), zero, neg, zero))
    for ref, value in zip((peak_ref, total_ref, arg_ref, best_ref, pick_ref), carry):
        pl_triton.store(ref.at[pl.ds(r0, rows)], value, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def markov_sample(base, temperature, gumbel, vec=None, w2=None, *, blocks: Blocks, interpret: bool = False):
    """The kernel's results for `reference.markov_sample`'s arguments: z / T [B, V] fp32 and,
    per split [splits, B], the running values (max of z / T, sum of exp(z / T - max), first
    argmax, Gumbel-max score, its index); `ops.finish` merges them."""
    b, v = base.shape
    bias = vec is not None
    steps = pl.cdiv(pl.cdiv(v, blocks.tile), blocks.splits)
    grid = (pl.cdiv(b, blocks.rows), blocks.splits)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, s: (0,) * len(shape))
    split_row = pl.BlockSpec((None, b), lambda i, s: (s, 0))
    inputs = [base, temperature.astype(jnp.float32), gumbel.astype(jnp.float32)] + ([vec, w2] if bias else [])
    per_split = lambda dtype: jax.ShapeDtypeStruct((blocks.splits, b), dtype)
    zt, peak, total, arg, best, pick = pl.pallas_call(
        functools.partial(_kernel, rows=blocks.rows, tile=blocks.tile, steps=steps, batch=b, vocab=v, bias=bias),
        grid=grid,
        in_specs=[whole(x.shape) for x in inputs],
        out_specs=[whole((b, v))] + [split_row] * 5,
        out_shape=[jax.ShapeDtypeStruct((b, v), jnp.float32), per_split(jnp.float32), per_split(jnp.float32),
                   per_split(jnp.int32), per_split(jnp.float32), per_split(jnp.int32)],
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret,
        name="markov_sample",
    )(*inputs)
    return zt, peak, total, arg, best, pick
