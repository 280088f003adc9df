"""Fused speculative rejection sampling for GPUs: a Pallas kernel lowered through Triton.

One program per row. Pass 1 streams the row's G + 1 target logit rows over the vocabulary in
tiles of `tile` entries, one logit row after another, keeping an online softmax per row (the
running max of z = logits / T, its first argmax, and the sum of exp(z - max)) and the logit at
each drafted token. That gives p_j(d_{j+1}) for the acceptance tests (uniforms given) and the
accepted count A without writing any probability. Pass 2 streams the one logit row A again,
with q_{A+1} and the Gumbel noise, and keeps three running values: the Gumbel-max of the
residual max(p_A - q_{A+1}, 0) (or of p_A for a bonus token), the residual's mass, and the
Gumbel-max of p_A as the fallback where the residual has none.

So a row reads (G + 1) + 1 logit rows, one q row and one noise row: fewer bytes than reading
p and q once, which an unfused verify (softmax, then rejection) does after writing p.
`reference.rejection_sample` is the definition; the kernel's sums run in another order, so a
comparison that ties to the last bit can differ (measure zero for random inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_NEG = -1e30  # a finite "minus infinity": a masked lane never wins a max


def _first_max(values: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
    """(max, index of its first occurrence + offset) of a [tile] vector."""
    best = jnp.max(values)
    lanes = lax.broadcasted_iota(jnp.int32, values.shape, 0)
    return best, offset + jnp.min(jnp.where(values == best, lanes, values.shape[0]))


def _kernel(logits_ref, temp_ref, q_ref, qtok_ref, tok_ref, len_ref, u_ref, noise_ref, acc_ref, next_ref, *,
            tile: int, vocab: int):
    """logits_ref [G + 1, V]; temp_ref [1]; q_ref [G, V]; qtok_ref, tok_ref, u_ref [G]; len_ref
    [1]; noise_ref [V] (this row's blocks); acc_ref, next_ref [1]."""
    g1 = logits_ref.shape[0]
    g = g1 - 1
    steps = pl.cdiv(vocab, tile)
    temperature = temp_ref[0]
    greedy = temperature == 0
    divisor = jnp.where(greedy, 1.0, temperature)
    lanes = lax.broadcasted_iota(jnp.int32, (tile,), 0)

    def z_tile(row, step):
        cols = step * tile + lanes
        x = pl_triton.load(logits_ref.at[row, pl.ds(step * tile, tile)], mask=cols < vocab, other=_NEG)
        return cols, jnp.where(cols < vocab, x.astype(jnp.float32) / divisor, _NEG)

    def softmax_row(row, token, live):
        """(max of z, its first index, sum exp(z - max), z at token) over the row's vocabulary;
        nothing is read unless `live`."""
        def body(step, carry):
            peak, arg, total, at_token = carry
            cols, z = z_tile(row, step)
            tile_peak, tile_arg = _first_max(z, step * tile)
            new_peak = jnp.maximum(peak, tile_peak)
            total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(z - new_peak))
            arg = jnp.where(tile_peak > peak, tile_arg, arg)
            at_token = at_token + jnp.sum(jnp.where(cols == token, z, 0.0))
            return new_peak, arg, total, at_token

        init = (jnp.float32(_NEG), jnp.int32(0), jnp.float32(1), jnp.float32(0))
        # both bounds int32 (a Python 0 beside a traced bound gives Triton's loop mixed types)
        return lax.fori_loop(jnp.int32(0), jnp.where(live, jnp.int32(steps), jnp.int32(0)), body, init)

    # Pass 1, row by row while drafts are accepted: row j is read only if d_1..d_j were, and it
    # is the residual's row (A = j) until d_{j+1} is accepted too.
    length = len_ref[0]
    accepting = jnp.bool_(True)
    accepted = jnp.int32(0)
    peak = total = jnp.float32(1)
    arg = jnp.int32(0)
    for j in range(g1):  # static: G + 1 logit rows
        token = tok_ref[j] if j < g else jnp.int32(-1)
        row_peak, row_arg, row_total, at_token = softmax_row(jnp.int32(j), token, accepting)
        peak, arg, total = (jnp.where(accepting, x, y) for x, y in ((row_peak, peak), (row_arg, arg),
                                                                      (row_total, total)))
        if j < g:
            p = jnp.where(greedy, (row_arg == token).astype(jnp.float32), jnp.exp(at_token - row_peak) / row_total)
            accepting = accepting & (j < length) & (u_ref[j] * qtok_ref[j] < p)
            accepted = accepted + accepting.astype(jnp.int32)
    rejected = accepted < length
    q_row = jnp.minimum(accepted, g - 1)

    def draw(step, carry):
        best_r, arg_r, mass, best_p, arg_p = carry
        cols, z = z_tile(accepted, step)
        inside = cols < vocab
        p = jnp.where(greedy, (cols == arg).astype(jnp.float32), jnp.exp(z - peak) / total)
        q = pl_triton.load(q_ref.at[q_row, pl.ds(step * tile, tile)], mask=inside, other=0.0)
        noise = pl_triton.load(noise_ref.at[pl.ds(step * tile, tile)], mask=inside, other=0.0)
        r = jnp.where(rejected, jnp.maximum(p - q, 0.0), p)
        score_r = jnp.where(inside & (r > 0), jnp.log(r) + noise, _NEG)
        score_p = jnp.where(inside & (p > 0), jnp.log(p) + noise, _NEG)
        tile_r, tile_arg_r = _first_max(score_r, step * tile)
        tile_p, tile_arg_p = _first_max(score_p, step * tile)
        return (jnp.maximum(best_r, tile_r), jnp.where(tile_r > best_r, tile_arg_r, arg_r), mass + jnp.sum(r),
                jnp.maximum(best_p, tile_p), jnp.where(tile_p > best_p, tile_arg_p, arg_p))

    init = (jnp.float32(_NEG), jnp.int32(0), jnp.float32(0), jnp.float32(_NEG), jnp.int32(0))
    _, arg_r, mass, _, arg_p = lax.fori_loop(0, steps, draw, init)
    acc_ref[...] = jnp.full((1,), accepted, jnp.int32)
    next_ref[...] = jnp.full((1,), jnp.where(mass > 0, arg_r, arg_p), jnp.int32)


@functools.partial(jax.jit, static_argnames=("tile", "interpret", "num_warps"))
def rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths, uniforms, gumbel, *, tile: int = 1024,
                     interpret: bool = False, num_warps: int = 4):
    """As `reference.rejection_sample` (same arguments and results); `tile` vocabulary entries
    per step (a power of two)."""
    b, g1, v = logits.shape
    g = g1 - 1
    row = lambda *dims: pl.BlockSpec((None, *dims), lambda i: (i,) + (0,) * len(dims))
    accepted, next_token = pl.pallas_call(
        functools.partial(_kernel, tile=tile, vocab=v),
        grid=(b,),
        in_specs=[row(g1, v), row(1), row(g, v), row(g), row(g), row(1), row(g), row(v)],
        out_specs=[row(1), row(1)],
        out_shape=[jax.ShapeDtypeStruct((b, 1), jnp.int32), jax.ShapeDtypeStruct((b, 1), jnp.int32)],
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="rejection_sample",
    )(logits, temperature.astype(jnp.float32)[:, None], q.astype(jnp.float32), q_tokens.astype(jnp.float32),
      draft_tokens.astype(jnp.int32), lengths.astype(jnp.int32)[:, None], uniforms.astype(jnp.float32),
      gumbel.astype(jnp.float32))
    return accepted[:, 0], next_token[:, 0]
