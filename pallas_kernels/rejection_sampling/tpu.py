"""Fused speculative rejection sampling for TPUs: two Pallas kernels lowered through Mosaic.

Pass 1, grid (rows, vocabulary tiles): each step takes one [G + 1, tile] block of a row's
target logits into VMEM (the block pipeline fetching the next meanwhile) and folds it into
running values per logit row, kept in the output blocks across the tiles: the max of
z = logits / T, its first index, the sum of exp(z - max) and z at the drafted token. The
acceptance tests then need G numbers per row (a few jnp operations on [B, G]), which give the
accepted count A.

Pass 2, grid (rows, tiles), with A and the row's softmax values prefetched into SMEM: each
step copies the next tiles of logit row A, draft row min(A, G - 1) and the noise from HBM
into double buffers (a block index map cannot pick one row of a [G + 1, V] slab), and keeps
the Gumbel-max of the residual max(p_A - q_{A+1}, 0) (of p_A for a bonus token), the
residual's mass and the Gumbel-max of p_A as the fallback where the residual has none.

Unlike the GPU kernel, pass 1 reads every logit row (the pipeline fetches blocks whatever
the tests decide), so a row reads (G + 1) + 1 logit rows, one q row and one noise row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import NEG, first_max


def _softmax_kernel(logits_ref, temp_ref, tok_ref, peak_ref, arg_ref, total_ref, at_ref, *, tile: int, vocab: int):
    """Blocks: logits_ref [G + 1, tile]; temp_ref [1, 1]; tok_ref [G + 1, 1] (the drafted token
    each logit row is tested at, -1 for the last); outputs [G + 1, 1] each."""
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        peak_ref[...] = jnp.full(peak_ref.shape, NEG, jnp.float32)
        arg_ref[...] = jnp.zeros(arg_ref.shape, jnp.int32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)
        at_ref[...] = jnp.zeros(at_ref.shape, jnp.float32)

    c0 = step * tile
    cols = c0 + lax.broadcasted_iota(jnp.int32, logits_ref.shape, 1)
    col_ok = cols < vocab  # the last tile may overhang V
    temperature = temp_ref[...]
    z = jnp.where(col_ok, logits_ref[...].astype(jnp.float32) / jnp.where(temperature == 0, 1.0, temperature), NEG)
    peak = peak_ref[...]
    tile_peak, tile_arg = first_max(z, c0)
    new_peak = jnp.maximum(peak, tile_peak)
    scaled = jnp.where(col_ok, jnp.exp(z - new_peak), 0.0)
    total_ref[...] = total_ref[...] * jnp.exp(peak - new_peak) + jnp.sum(scaled, axis=1, keepdims=True)
    arg_ref[...] = jnp.where(tile_peak > peak, tile_arg, arg_ref[...])
    peak_ref[...] = new_peak
    at_ref[...] += jnp.sum(jnp.where(cols == tok_ref[...], z, 0.0), axis=1, keepdims=True)


def _residual_kernel(acc_ref, qrow_ref, rej_ref, temp_ref, peak_ref, total_ref, arg_ref, logits_hbm, q_hbm,
                     noise_hbm, best_r_ref, arg_r_ref, mass_ref, best_p_ref, arg_p_ref, logits_buf, q_buf, noise_buf,
                     sems, *, tile: int, vocab: int):
    """SMEM, per row [B]: acc_ref (A), qrow_ref (min(A, G - 1)), rej_ref (A < L), temp_ref and
    row A's softmax values peak_ref, total_ref, arg_ref. In HBM: logits_hbm [B, G + 1, V],
    q_hbm [B, G, V], noise_hbm [B, V], whose tiles of rows A, min(A, G - 1) and the noise are
    copied into the double buffers logits_buf, q_buf, noise_buf [2, 1, tile], one step ahead.
    Outputs [1, 1] each."""
    row, step = pl.program_id(0), pl.program_id(1)
    steps = pl.num_programs(1)

    def copies(s, slot):
        c0 = jnp.minimum(s * tile, vocab - tile)  # the last tile ends at V, overlapping the one before
        sources = (logits_hbm.at[row, pl.ds(acc_ref[row], 1), pl.ds(c0, tile)],
                   q_hbm.at[row, pl.ds(qrow_ref[row], 1), pl.ds(c0, tile)],
                   noise_hbm.at[pl.ds(row, 1), pl.ds(c0, tile)])
        return [pltpu.make_async_copy(src, buf.at[slot], sems.at[k, slot])
                for k, (src, buf) in enumerate(zip(sources, (logits_buf, q_buf, noise_buf)))]

    slot = step % 2

    @pl.when(step == 0)
    def _():
        best_r_ref[...] = jnp.full(best_r_ref.shape, NEG, jnp.float32)
        arg_r_ref[...] = jnp.zeros(arg_r_ref.shape, jnp.int32)
        mass_ref[...] = jnp.zeros(mass_ref.shape, jnp.float32)
        best_p_ref[...] = jnp.full(best_p_ref.shape, NEG, jnp.float32)
        arg_p_ref[...] = jnp.zeros(arg_p_ref.shape, jnp.int32)
        for copy in copies(step, slot):
            copy.start()

    @pl.when(step + 1 < steps)
    def _():
        for copy in copies(step + 1, 1 - slot):
            copy.start()

    for copy in copies(step, slot):
        copy.wait()
    c0 = jnp.minimum(step * tile, vocab - tile)
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
    fresh = cols >= step * tile  # lanes the tile before has not counted
    temperature = temp_ref[row]
    greedy = temperature == 0
    z = logits_buf[slot].astype(jnp.float32) / jnp.where(greedy, 1.0, temperature)  # [1, tile]
    p = jnp.where(greedy, (cols == arg_ref[row]).astype(jnp.float32), jnp.exp(z - peak_ref[row]) / total_ref[row])
    p = jnp.where(fresh, p, 0.0)
    r = jnp.where(rej_ref[row] > 0, jnp.maximum(p - q_buf[slot], 0.0), p)
    noise = noise_buf[slot]
    tile_r, tile_arg_r = first_max(jnp.where(r > 0, jnp.log(r) + noise, NEG), c0)
    tile_p, tile_arg_p = first_max(jnp.where(p > 0, jnp.log(p) + noise, NEG), c0)
    arg_r_ref[...] = jnp.where(tile_r > best_r_ref[...], tile_arg_r, arg_r_ref[...])
    best_r_ref[...] = jnp.maximum(best_r_ref[...], tile_r)
    arg_p_ref[...] = jnp.where(tile_p > best_p_ref[...], tile_arg_p, arg_p_ref[...])
    best_p_ref[...] = jnp.maximum(best_p_ref[...], tile_p)
    mass_ref[...] += jnp.sum(r, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("tile", "interpret"))
def rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths, uniforms, gumbel, *, tile: int = 2048,
                     interpret=False):
    """As `reference.rejection_sample` (same arguments and results); tile: vocabulary entries
    per step (a multiple of 128); interpret: False, or `pltpu.InterpretParams` to run it on
    the TPU interpreter."""
    b, g1, v = logits.shape
    g = g1 - 1
    tile = min(tile, v)  # a vocabulary narrower than a tile is one block
    tiles = pl.cdiv(v, tile)
    temperature = temperature.astype(jnp.float32)
    tested = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    per_logit_row = pl.BlockSpec((None, g1, 1), lambda i, j: (i, 0, 0))
    stat = lambda dtype: jax.ShapeDtypeStruct((b, g1, 1), dtype)
    peak, arg, total, at_token = (x[..., 0] for x in pl.pallas_call(
        functools.partial(_softmax_kernel, tile=tile, vocab=v),
        grid=(b, tiles),
        in_specs=[pl.BlockSpec((None, g1, tile), lambda i, j: (i, 0, j)),
                  pl.BlockSpec((None, 1, 1), lambda i, j: (i, 0, 0)), per_logit_row],
        out_specs=[per_logit_row] * 4,
        out_shape=[stat(jnp.float32), stat(jnp.int32), stat(jnp.float32), stat(jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="rejection_softmax",
    )(logits, temperature[:, None, None], tested[..., None]))  # [B, G + 1] each

    greedy = (temperature == 0)[:, None]
    p_d = jnp.where(greedy, (arg[:, :g] == draft_tokens).astype(jnp.float32),
                    jnp.exp(at_token[:, :g] - peak[:, :g]) / total[:, :g])  # p_j(d_{j+1}) [B, G]
    ok = (uniforms * q_tokens < p_d) & (jnp.arange(g)[None, :] < lengths[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # [B]
    at_row = lambda x: jnp.take_along_axis(x, accepted[:, None], axis=1)[:, 0]
    q_row = jnp.minimum(accepted, g - 1)
    rejected = (accepted < lengths).astype(jnp.int32)

    one = pl.BlockSpec((None, 1, 1), lambda i, j, *_: (i, 0, 0))
    out = lambda dtype: jax.ShapeDtypeStruct((b, 1, 1), dtype)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    _, arg_r, mass, _, arg_p = pl.pallas_call(
        functools.partial(_residual_kernel, tile=tile, vocab=v),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(b, tiles),
            in_specs=[hbm, hbm, hbm],
            out_specs=[one] * 5,
            scratch_shapes=[pltpu.VMEM((2, 1, tile), logits.dtype), pltpu.VMEM((2, 1, tile), jnp.float32),
                            pltpu.VMEM((2, 1, tile), jnp.float32), pltpu.SemaphoreType.DMA((3, 2))],
        ),
        out_shape=[out(jnp.float32), out(jnp.int32), out(jnp.float32), out(jnp.float32), out(jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="rejection_residual",
    )(accepted, q_row, rejected, temperature, at_row(peak), at_row(total), at_row(arg), logits, q.astype(jnp.float32),
      gumbel.astype(jnp.float32))
    return accepted, jnp.where(mass[:, 0, 0] > 0, arg_r[:, 0, 0], arg_p[:, 0, 0]).astype(jnp.int32)
