"""Ragged paged attention for TPUs: a Pallas kernel lowered through Mosaic.

Layout: each program takes one row b and one step of its block table (`pages` table columns,
block_k = pages * page_size keys); the grid walks a row's steps in order ("arbitrary"), rows in
parallel. All KV heads of the row are handled together: its queries are [K, rows, D] (query
row i = t * R + r, R query heads per KV head, padded to whole sublane tiles with rows that
see nothing). The keys and values of a step come from the shared pools [P, page_size, K, D]
in HBM by DMA, one copy per (page, head) into head-major double buffers [2, K, block_k, D], a
step ahead of the one being computed. Per head the scores and the value product run on the
MXU with an online softmax in fp32, kept in VMEM scratch across the steps.

A row copies and computes only the steps its queries can see (from its first query's window
start, or 0, up to min(kv_length, last query position + 1)), prefetched into SMEM as step
bounds with the flattened block table: the work follows each row's length, not the table's
width. The output and the log-sum-exp of each query's scores are written at the last step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import NEG

SUBLANES = 8  # query rows are padded to a multiple of this


def _kernel(table_ref, length_ref, first_ref, last_ref, q_ref, qpos_ref, k_hbm, v_hbm, o_ref, lse_ref,
            k_buf, v_buf, sems, acc_ref, peak_ref, total_ref, *, pages: int, page_size: int, columns: int,
            scale: float, window: int | None):
    """SMEM: table_ref [B * columns] (the block table, flattened), length_ref, first_ref,
    last_ref [B] (the row's length and its first and last + 1 steps). Blocks: q_ref [K, rows,
    D]; qpos_ref [rows, 1] (-1 for padding rows). HBM: k_hbm, v_hbm [P, page_size, K, D].
    Outputs o_ref [K, rows, D], lse_ref [K, rows, 1]. Scratch: k_buf, v_buf [2, K, block_k,
    D]; sems [2, 2] DMA semaphores; acc_ref [K, rows, D], peak_ref, total_ref [K, rows, 1]."""
    row, step = pl.program_id(0), pl.program_id(1)
    kv_heads = q_ref.shape[0]
    block_k = pages * page_size
    first, last = first_ref[row], last_ref[row]

    def copies(s):
        slot = s % 2
        out = []
        for i in range(pages):
            page = table_ref[row * columns + s * pages + i]
            keys = pl.ds(i * page_size, page_size)
            for h in range(kv_heads):
                out.append(pltpu.make_async_copy(k_hbm.at[page, :, h, :], k_buf.at[slot, h, keys, :], sems.at[0, slot]))
                out.append(pltpu.make_async_copy(v_hbm.at[page, :, h, :], v_buf.at[slot, h, keys, :], sems.at[1, slot]))
        return out

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        peak_ref[...] = jnp.full(peak_ref.shape, NEG, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)

    @pl.when((step == first) & (step < last))
    def _():
        for copy in copies(step):
            copy.start()

    @pl.when((step + 1 > first) & (step + 1 < last))
    def _():
        for copy in copies(step + 1):
            copy.start()

    @pl.when((step >= first) & (step < last))
    def _():
        for copy in copies(step):
            copy.wait()
        slot = step % 2
        qpos = qpos_ref[...]  # [rows, 1]
        slots = step * block_k + lax.broadcasted_iota(jnp.int32, (qpos.shape[0], block_k), 1)
        visible = (slots <= qpos) & (slots < length_ref[row])
        if window is not None:
            visible = visible & (qpos - slots < window)
        for h in range(kv_heads):
            k = k_buf[slot, h]  # [block_k, D]
            v = v_buf[slot, h]
            scores = lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            scores = jnp.where(visible, scores * scale, NEG)  # [rows, block_k]
            peak = peak_ref[h]
            new_peak = jnp.maximum(peak, jnp.max(scores, axis=1, keepdims=True))
            probs = jnp.where(visible, jnp.exp(scores - new_peak), 0.0)
            rescale = jnp.exp(peak - new_peak)
            total_ref[h] = total_ref[h] * rescale + jnp.sum(probs, axis=1, keepdims=True)
            acc_ref[h] = acc_ref[h] * rescale + jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
            peak_ref[h] = new_peak

    @pl.when(step == pl.num_programs(1) - 1)
    def _():
        total = total_ref[...]
        seen = total > 0
        o_ref[...] = (acc_ref[...] / jnp.where(seen, total, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, peak_ref[...] + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("pages", "interpret", "return_lse", "scale", "window"))
def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                           q_positions: jax.Array, kv_lengths: jax.Array, *, pages: int = 4, interpret=False,
                           return_lse: bool = False, scale: float | None = None, window: int | None = None):
    """As `reference.ragged_paged_attention` (same arguments and results); pages: block-table
    columns per step; interpret: False, or `pltpu.InterpretParams` to run it on the TPU
    interpreter."""
    b, t, n, d = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    group = n // kv_heads
    rows = t * group
    padded = -(-rows // SUBLANES) * SUBLANES
    capacity = block_table.shape[1] * page_size
    block_table = jnp.pad(block_table.astype(jnp.int32), ((0, 0), (0, -block_table.shape[1] % pages)))  # whole steps
    columns = block_table.shape[1]
    block_k = pages * page_size
    # [B, T, K, R, D] -> [B, K, T * R, D], query row i = t * R + r, padded with rows that see nothing
    qr = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))
    qpos = jnp.pad(jnp.repeat(q_positions.astype(jnp.int32), group, axis=1), ((0, 0), (0, padded - rows)),
                   constant_values=-1)  # [B, rows]
    lengths = jnp.minimum(kv_lengths.astype(jnp.int32), capacity)  # no key past what the table holds
    needed = jnp.minimum(lengths, jnp.max(qpos, axis=1) + 1)  # keys a row can see
    last = -(-needed // block_k)
    first = jnp.zeros_like(last)
    if window is not None:  # steps wholly before the first real query's window are skipped
        lowest = jnp.min(jnp.where(qpos >= 0, qpos, capacity), axis=1)
        first = jnp.maximum(lowest - window + 1, 0) // block_k
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    o, lse = pl.pallas_call(
        functools.partial(_kernel, pages=pages, page_size=page_size, columns=columns,
                          scale=d**-0.5 if scale is None else scale, window=window),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, columns // pages),
            in_specs=[pl.BlockSpec((None, kv_heads, padded, d), lambda i, j, *_: (i, 0, 0, 0)),
                      pl.BlockSpec((None, padded, 1), lambda i, j, *_: (i, 0, 0)), hbm, hbm],
            out_specs=[pl.BlockSpec((None, kv_heads, padded, d), lambda i, j, *_: (i, 0, 0, 0)),
                       pl.BlockSpec((None, kv_heads, padded, 1), lambda i, j, *_: (i, 0, 0, 0))],
            scratch_shapes=[pltpu.VMEM((2, kv_heads, block_k, d), k_pages.dtype),
                            pltpu.VMEM((2, kv_heads, block_k, d), v_pages.dtype), pltpu.SemaphoreType.DMA((2, 2)),
                            pltpu.VMEM((kv_heads, padded, d), jnp.float32),
                            pltpu.VMEM((kv_heads, padded, 1), jnp.float32),
                            pltpu.VMEM((kv_heads, padded, 1), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, padded, d), q.dtype),
                   jax.ShapeDtypeStruct((b, kv_heads, padded, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_paged_attention",
    )(block_table.reshape(-1), lengths, first, last, qr, qpos[..., None], k_pages, v_pages)
    out = o[:, :, :rows].reshape(b, kv_heads, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, n, d)
    if not return_lse:
        return out
    return out, lse[:, :, :rows, 0].reshape(b, kv_heads, t, group).transpose(0, 2, 1, 3).reshape(b, t, n)
