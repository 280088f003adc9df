"""One draft slot's sampling step for TPUs: a Pallas kernel lowered through Mosaic.

The grid is (row blocks, vocabulary tiles), the tiles walked in order on one core (the
"arbitrary" axis) while row blocks may run on the chip's cores in parallel. Per tile, with the
block pipeline fetching the next tiles of the logits, W2 and the noise into VMEM meanwhile,
the kernel forms z = base + vec W2^T (the bias on the MXU), divides by the row's temperature,
writes z / T and folds the tile into the row's running values, which stay in the output
blocks of [B, 1] across the tiles: the max of z / T and its first index, the sum of
exp(z / T - max), and the Gumbel-max argmax of z / T + g. `ops.finish` turns them into q and
the token, as for the GPU kernel (one split).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import NEG, first_max

MAX_ROWS = 256  # rows per block (a batch up to this size is one block)


def _kernel(base_ref, temp_ref, noise_ref, *refs, tile: int, vocab: int, bias: bool):
    """Blocks: base_ref, noise_ref [rows, tile]; temp_ref [rows, 1]; with a bias vec_ref
    [rows, R] and w2_ref [tile, R]; outputs zt_ref [rows, tile] and the running values
    [rows, 1] each."""
    if bias:
        vec_ref, w2_ref, *refs = refs
    zt_ref, peak_ref, total_ref, arg_ref, best_ref, pick_ref = refs
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        peak_ref[...] = jnp.full(peak_ref.shape, NEG, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)
        arg_ref[...] = jnp.zeros(arg_ref.shape, jnp.int32)
        best_ref[...] = jnp.full(best_ref.shape, NEG, jnp.float32)
        pick_ref[...] = jnp.zeros(pick_ref.shape, jnp.int32)

    c0 = step * tile
    col_ok = c0 + lax.broadcasted_iota(jnp.int32, base_ref.shape, 1) < vocab  # the last tile may overhang V
    z = base_ref[...].astype(jnp.float32)
    if bias:
        z = z + lax.dot_general(vec_ref[...], w2_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    temperature = temp_ref[...]
    zt = z / jnp.where(temperature == 0, 1.0, temperature)
    zt_ref[...] = zt
    zt = jnp.where(col_ok, zt, NEG)
    peak = peak_ref[...]
    tile_peak, tile_arg = first_max(zt, c0)
    new_peak = jnp.maximum(peak, tile_peak)
    scaled = jnp.where(col_ok, jnp.exp(zt - new_peak), 0.0)
    total_ref[...] = total_ref[...] * jnp.exp(peak - new_peak) + jnp.sum(scaled, axis=1, keepdims=True)
    arg_ref[...] = jnp.where(tile_peak > peak, tile_arg, arg_ref[...])
    peak_ref[...] = new_peak
    tile_best, tile_pick = first_max(jnp.where(col_ok, zt + noise_ref[...], NEG), c0)
    pick_ref[...] = jnp.where(tile_best > best_ref[...], tile_pick, pick_ref[...])
    best_ref[...] = jnp.maximum(best_ref[...], tile_best)


@functools.partial(jax.jit, static_argnames=("tile", "interpret"))
def markov_sample(base, temperature, gumbel, vec=None, w2=None, *, tile: int = 512, interpret=False):
    """The kernel's results for `reference.markov_sample`'s arguments, as the GPU kernel's with
    one split: z / T [B, V] fp32 and the running values [1, B] each. tile: vocabulary columns
    per step (a multiple of 128); interpret: False, or `pltpu.InterpretParams` to run it on
    the TPU interpreter."""
    b, v = base.shape
    bias = vec is not None
    tile = min(tile, v)  # a vocabulary narrower than a tile is one block
    rows = b if b <= MAX_ROWS else MAX_ROWS
    grid = (pl.cdiv(b, rows), pl.cdiv(v, tile))
    wide = pl.BlockSpec((rows, tile), lambda i, j: (i, j))
    column = pl.BlockSpec((rows, 1), lambda i, j: (i, 0))
    in_specs = [wide, column, wide]
    inputs = [base, temperature.astype(jnp.float32)[:, None], gumbel.astype(jnp.float32)]
    if bias:
        rank = vec.shape[1]
        in_specs += [pl.BlockSpec((rows, rank), lambda i, j: (i, 0)), pl.BlockSpec((tile, rank), lambda i, j: (j, 0))]
        inputs += [vec, w2]
    stat = lambda dtype: jax.ShapeDtypeStruct((b, 1), dtype)
    zt, *stats = pl.pallas_call(
        functools.partial(_kernel, tile=tile, vocab=v, bias=bias),
        grid=grid,
        in_specs=in_specs,
        out_specs=[wide] + [column] * 5,
        out_shape=[jax.ShapeDtypeStruct((b, v), jnp.float32), stat(jnp.float32), stat(jnp.float32),
                   stat(jnp.int32), stat(jnp.float32), stat(jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="markov_sample",
    )(*inputs)
    return (zt, *(x[:, 0][None] for x in stats))
