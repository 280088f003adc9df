"""Fused speculative rejection sampling for GPUs: two Pallas kernels lowered through Triton.

The vocabulary of every row is cut into S slices of whole tiles, and each kernel runs one
program per (row, slice), so that a batch of 64 rows still fills the GPU (`splits` picks S):

- `_scan_kernel` streams its slice of the row's G + 1 target logit rows in tiles of `tile`
  entries and keeps, per logit row, an online softmax (the running max of z = logits / T, its
  first argmax, and the sum of exp(z - max)) and z at the drafted token. Combining the slices
  (a few numbers per row, in jnp) gives p_j(d_{j+1}) for the acceptance tests (uniforms given),
  the accepted count A, and the softmax of row A, without writing any probability.
- `_draw_kernel` streams its slice of logit row A again, with q_{A+1} and the Gumbel noise,
  and keeps three running values: the Gumbel-max of the residual max(p_A - q_{A+1}, 0) (or of
  p_A for a bonus token), the residual's mass, and the Gumbel-max of p_A as the fallback where
  the residual has none. Combining the slices gives the next token.

So a row reads G + 2 logit rows, one q row and one noise row: with bf16 logits, fewer bytes
than reading p and q once in fp32, which an unfused verify (softmax, then rejection) does after
writing p. Ties go to the
lowest vocabulary index, as `jnp.argmax` does. `reference.rejection_sample` is the definition;
the kernels' sums run in another order, so a comparison that ties to the last bit can differ
(measure zero for random inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._common import NEG, first_max

PROGRAMS = 1024  # (row, slice) programs to aim for: several per SM of a Hopper GPU (132 SMs)


def splits(rows: int, vocab: int, tile: int, wanted: int | None = None) -> tuple[int, int]:
    """(S, span): the vocabulary slices per row and the entries in each (a whole number of
    tiles; the last slice may be shorter). S is near `wanted`, by default near PROGRAMS / rows,
    and at most one slice per tile."""
    if wanted is not None and wanted < 1:
        raise ValueError(f"num_splits must be at least 1, got {wanted}")
    tiles = pl.cdiv(vocab, tile)
    wanted = max(1, pl.cdiv(PROGRAMS, rows)) if wanted is None else wanted
    per_slice = pl.cdiv(tiles, min(tiles, wanted))
    return pl.cdiv(tiles, per_slice), per_slice * tile


def _put(vector: jax.Array, index: int, value) -> jax.Array:
    """vector with entry `index` (static) set to value (a register write Triton can lower)."""
    return jnp.where(lax.broadcasted_iota(jnp.int32, vector.shape, 0) == index, value, vector)


def _slice_tiles(vocab: int, tile: int, span: int):
    """(z_tile, steps, start) for this program's slice, which starts at vocabulary index
    `start`: z_tile(logits_ref, row, divisor, step) loads tile `step` of the slice from logit
    row `row` of a [rows, V] block as (vocabulary indices, z = logits / T with masked lanes at
    NEG)."""
    start = pl.program_id(1) * span
    steps = pl.cdiv(jnp.minimum(span, vocab - start), tile)
    lanes = lax.broadcasted_iota(jnp.int32, (tile,), 0)

    def z_tile(logits_ref, row, divisor, step):
        cols = start + step * tile + lanes
        inside = cols < vocab
        x = pl_triton.load(logits_ref.at[row, pl.ds(start + step * tile, tile)], mask=inside, other=NEG)
        return cols, jnp.where(inside, x.astype(jnp.float32) / divisor, NEG)

    return z_tile, steps, start


def _scan_kernel(logits_ref, temp_ref, tok_ref, peak_ref, arg_ref, total_ref, at_ref, *, tile: int, vocab: int,
                 span: int):
    """logits_ref [G + 1, V]; temp_ref [1]; tok_ref [G] (this row's blocks). Out, for this
    (row, slice), per logit row j (padded to a power of two): the max of z, its first index,
    sum exp(z - max), and z at d_{j+1} (0 where that token is outside the slice)."""
    g1 = logits_ref.shape[0]
    temperature = temp_ref[0]
    divisor = jnp.where(temperature == 0, 1.0, temperature)
    z_tile, steps, start = _slice_tiles(vocab, tile, span)
    peaks, totals, ats = (jnp.zeros(peak_ref.shape, jnp.float32) for _ in range(3))
    args = jnp.zeros(arg_ref.shape, jnp.int32)
    for j in range(g1):  # static: G + 1 logit rows
        token = tok_ref[j] if j < g1 - 1 else jnp.int32(-1)

        def body(step, carry, j=j, token=token):
            peak, arg, total, at_token = carry
            cols, z = z_tile(logits_ref, jnp.int32(j), divisor, step)
            tile_peak, tile_arg = first_max(z, start + step * tile, keepdims=False)
            new_peak = jnp.maximum(peak, tile_peak)
            total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(z - new_peak))
            arg = jnp.where(tile_peak > peak, tile_arg, arg)
            return new_peak, arg, total, at_token + jnp.sum(jnp.where(cols == token, z, 0.0))

        init = (jnp.float32(NEG), jnp.int32(0), jnp.float32(0), jnp.float32(0))
        # both bounds int32 (a Python 0 beside a traced bound gives Triton's loop mixed types)
        peak, arg, total, at_token = lax.fori_loop(jnp.int32(0), steps.astype(jnp.int32), body, init)
        peaks, args = _put(peaks, j, peak), _put(args, j, arg)
        totals, ats = _put(totals, j, total), _put(ats, j, at_token)
    peak_ref[...], arg_ref[...], total_ref[...], at_ref[...] = peaks, args, totals, ats


def _draw_kernel(logits_ref, q_ref, noise_ref, row_ref, stat_ref, best_ref, which_ref, *, tile: int, vocab: int,
                 span: int):
    """logits_ref [G + 1, V]; q_ref [G, V]; noise_ref [V] (this row's blocks); row_ref [4]:
    A, the q row of the residual, whether a draft was rejected, the argmax of row A; stat_ref
    [4]: T, row A's max of z and sum exp(z - max), unused. Out for this (row, slice): best_ref
    [4] the residual's best score, its mass, p_A's best score, unused; which_ref [2] their
    indices."""
    accepted, q_row, rejected, top = row_ref[0], row_ref[1], row_ref[2] > 0, row_ref[3]
    temperature, peak, total = stat_ref[0], stat_ref[1], stat_ref[2]
    greedy = temperature == 0
    z_tile, steps, start = _slice_tiles(vocab, tile, span)

    def body(step, carry):
        best_r, arg_r, mass, best_p, arg_p = carry
        cols, z = z_tile(logits_ref, accepted, jnp.where(greedy, 1.0, temperature), step)
        inside = cols < vocab
        p = jnp.where(greedy, (cols == top).astype(jnp.float32), jnp.exp(z - peak) / total)
        q = pl_triton.load(q_ref.at[q_row, pl.ds(start + step * tile, tile)], mask=inside, other=0.0)
        noise = pl_triton.load(noise_ref.at[pl.ds(start + step * tile, tile)], mask=inside, other=0.0)
        r = jnp.where(rejected, jnp.maximum(p - q, 0.0), p)
        offset = start + step * tile
        tile_r, tile_arg_r = first_max(jnp.where(inside & (r > 0), jnp.log(r) + noise, NEG), offset, keepdims=False)
        tile_p, tile_arg_p = first_max(jnp.where(inside & (p > 0), jnp.log(p) + noise, NEG), offset, keepdims=False)
        return (jnp.maximum(best_r, tile_r), jnp.where(tile_r > best_r, tile_arg_r, arg_r), mass + jnp.sum(r),
                jnp.maximum(best_p, tile_p), jnp.where(tile_p > best_p, tile_arg_p, arg_p))

    init = (jnp.float32(NEG), jnp.int32(0), jnp.float32(0), jnp.float32(NEG), jnp.int32(0))
    best_r, arg_r, mass, best_p, arg_p = lax.fori_loop(jnp.int32(0), steps.astype(jnp.int32), body, init)
    best_ref[...] = _put(_put(_put(jnp.zeros((4,), jnp.float32), 0, best_r), 1, mass), 2, best_p)
    which_ref[...] = _put(_put(jnp.zeros((2,), jnp.int32), 0, arg_r), 1, arg_p)


def _combine_max(best: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Over the slice axis (1) of best [B, S, ...]: (the max, the index of the first slice
    holding it), the slices being in vocabulary order."""
    first = jnp.argmax(best, axis=1)[:, None]
    return jnp.max(best, axis=1), jnp.take_along_axis(index, first, axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("tile", "interpret", "num_warps", "num_splits"))
def rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths, uniforms, gumbel, *, tile: int = 2048,
                     interpret: bool = False, num_warps: int = 4, num_splits: int | None = None):
    """As `reference.rejection_sample` (same arguments and results); `tile` vocabulary entries
    per step (a power of two); `num_splits` vocabulary slices per row (default: `splits`)."""
    b, g1, v = logits.shape
    g = g1 - 1
    s, span = splits(b, v, tile, num_splits)
    gp = pl.next_power_of_2(g1)
    temperature = temperature.astype(jnp.float32)
    whole = lambda *dims: pl.BlockSpec((None, *dims), lambda i, k: (i,) + (0,) * len(dims))
    part = lambda *dims: pl.BlockSpec((None, None, *dims), lambda i, k: (i, k) + (0,) * len(dims))
    params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=2)
    kw = dict(tile=tile, vocab=v, span=span)

    out = lambda dtype: jax.ShapeDtypeStruct((b, s, gp), dtype)
    peak, arg, total, at = pl.pallas_call(  # [B, S, Gp] each
        functools.partial(_scan_kernel, **kw), grid=(b, s),
        in_specs=[whole(g1, v), whole(1), whole(g)], out_specs=[part(gp)] * 4,
        out_shape=[out(jnp.float32), out(jnp.int32), out(jnp.float32), out(jnp.float32)],
        compiler_params=params, interpret=interpret, name="rejection_scan",
    )(logits, temperature[:, None], draft_tokens.astype(jnp.int32))

    # The softmax of each logit row over the whole vocabulary, from the slices'.
    row_peak, row_arg = _combine_max(peak[..., :g1], arg[..., :g1])  # [B, G + 1]
    row_total = jnp.sum(total[..., :g1] * jnp.exp(peak[..., :g1] - row_peak[:, None]), axis=1)
    at_token = jnp.sum(at[..., :g], axis=1)  # z_j(d_{j+1}) [B, G]
    greedy = (temperature == 0)[:, None]
    p_d = jnp.where(greedy, (row_arg[:, :g] == draft_tokens).astype(jnp.float32),
                    jnp.exp(at_token - row_peak[:, :g]) / row_total[:, :g])
    ok = (uniforms * q_tokens.astype(jnp.float32) < p_d) & (jnp.arange(g)[None, :] < lengths[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # [B]
    pick = lambda x: jnp.take_along_axis(x, accepted[:, None], axis=1)[:, 0]
    rows = jnp.stack([accepted, jnp.minimum(accepted, g - 1), (accepted < lengths).astype(jnp.int32),
                      pick(row_arg)], axis=1)  # [B, 4]
    stats = jnp.stack([temperature, pick(row_peak), pick(row_total), jnp.zeros_like(temperature)],
                      axis=1)  # [B, 4]

    best, which = pl.pallas_call(  # [B, S, 4], [B, S, 2]
        functools.partial(_draw_kernel, **kw), grid=(b, s),
        in_specs=[whole(g1, v), whole(g, v), whole(v), whole(4), whole(4)], out_specs=[part(4), part(2)],
        out_shape=[jax.ShapeDtypeStruct((b, s, 4), jnp.float32), jax.ShapeDtypeStruct((b, s, 2), jnp.int32)],
        compiler_params=params, interpret=interpret, name="rejection_draw",
    )(logits, q.astype(jnp.float32), gumbel.astype(jnp.float32), rows, stats)
    _, from_residual = _combine_max(best[..., 0], which[..., 0])
    _, from_p = _combine_max(best[..., 2], which[..., 1])
    mass = jnp.sum(best[..., 1], axis=1)
    return accepted, jnp.where(mass > 0, from_residual, from_p).astype(jnp.int32)
