"""Ragged paged attention for GPUs: a Pallas kernel lowered through Triton.

Layout: each program takes one row b, one KV head k, one block of `block_q` query rows of that
head's group (query row i = t * R + r, R query heads per KV head, padded with rows that see
nothing) and one split of the row's pages. It walks the pages its queries can see, `pages`
block-table entries at a time (`block_k` = pages * page_size keys per step, gathered from the
pool by page id), with an online softmax in fp32, and writes its normalised output and the
log-sum-exp of its scores. A row reads only the pages below min(kv_length, its last query
position + 1), and with a sliding window only those from its first query's window on: the
work follows each row's length, not the block table's width. With several
splits (long contexts over few rows: flash-decoding), the partial outputs are merged in XLA.

The kernel runs on the Triton backend of Pallas (power-of-two block shapes, `dot` with at
least 16 rows and columns: `unsupported` says which calls it cannot take); off a GPU it runs in
interpret mode, which checks its logic but not those rules.
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

    block_q: int  # query rows per program (a power of two >= 16)
    pages: int  # pages per inner step (block_k = pages * page_size keys)
    splits: int  # programs sharing one row's pages
    num_warps: int = 4
    num_stages: int = 2


def unsupported(head_dim: int, page_size: int, itemsize: int = 2) -> str | None:
    """Why the compiled kernel cannot take this shape of `itemsize`-byte keys (None: it can)."""
    pow2 = lambda x: x > 0 and x & (x - 1) == 0
    if not (pow2(head_dim) and head_dim >= 16):
        return f"head_dim={head_dim} is not a power of two >= 16"
    if not pow2(page_size):
        return f"page_size={page_size} is not a power of two"
    if page_size * head_dim * itemsize > 128 * 128 * 2:  # a page of keys and values per pipeline stage in shared memory
        return (f"page_size={page_size} x head_dim={head_dim} x {itemsize} bytes is too large (at most 128 x 128 x 2: "
                f"the shared memory of an H200)")
    return None


def _kernel(q_ref, qpos_ref, length_ref, table_ref, k_ref, v_ref, o_ref, lse_ref, *, pages: int,
            blocks_per_split: int, capacity: int, scale: float, window: int | None):
    """q_ref [block_q, D]; qpos_ref [block_q]; length_ref [1]; table_ref [M]; k_ref, v_ref
    [P, page_size, D] (this KV head's pools); o_ref [block_q, D]; lse_ref [block_q]."""
    split = pl.program_id(3)
    block_q, d = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages * page_size
    q = q_ref[...]
    qpos = qpos_ref[...]  # [block_q], -1 for padding rows
    # keys this block can see: below the row's length, its last query's position + 1 and the
    # positions its block table holds (`capacity`; the padding columns past it are never read)
    needed = jnp.minimum(jnp.minimum(length_ref[0], jnp.max(qpos) + 1), capacity)
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(needed, block_k))
    if window is not None:  # steps wholly before the first real query's window are skipped
        lowest = jnp.min(jnp.where(qpos >= 0, qpos, capacity))
        first = jnp.maximum(first, jnp.maximum(lowest - window + 1, 0) // block_k)

    key = lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    key_column, key_slot = key // page_size, key % page_size  # [block_k]: each key's table column and page slot

    def body(j, carry):
        acc, peak, total = carry  # [block_q, D], [block_q], [block_q] fp32
        # each key's row is addressed on its own (its page id gathered from the table), so the
        # load is one [block_k, D] gather that feeds the dot directly: Triton's pipeliner then
        # copies keys and values asynchronously into shared memory (the values of a [pages,
        # page_size, D] load reshaped for the dot went through registers instead: docs/benchmarks.md)
        ids = table_ref[j * pages + key_column]  # [block_k]
        k = k_ref[ids, key_slot, :]  # [block_k, D]
        v = v_ref[ids, key_slot, :]
        scores = pl_triton.dot(q, k, trans_b=True, allow_tf32=False) * scale  # [block_q, block_k] fp32
        slots = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        visible = (slots <= qpos[:, None]) & (slots < needed)
        if window is not None:
            visible = visible & (qpos[:, None] - slots < window)
        scores = jnp.where(visible, scores, NEG)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=1))
        probs = jnp.where(visible, jnp.exp(scores - new_peak[:, None]), 0.0)
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + pl_triton.dot(probs.astype(v.dtype), v, allow_tf32=False)
        return acc, new_peak, total

    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, peak, total = lax.fori_loop(first, last, body, init)
    seen = total > 0
    o_ref[...] = (acc / jnp.where(seen, total, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret", "return_lse", "scale", "window"))
def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                           q_positions: jax.Array, kv_lengths: jax.Array, *, blocks: Blocks,
                           interpret: bool = False, return_lse: bool = False, scale: float | None = None,
                           window: int | None = None):
    """As `reference.ragged_paged_attention` (same arguments and results)."""
    b, t, n, d = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = n // kv_heads
    rows = t * group
    block_q, pages, splits = blocks.block_q, blocks.pages, blocks.splits
    capacity = block_table.shape[1] * page_size
    block_table = jnp.pad(block_table, ((0, 0), (0, -block_table.shape[1] % pages)))  # whole steps
    m = block_table.shape[1]
    q_blocks = pl.cdiv(rows, block_q)
    padded = q_blocks * block_q
    # [B, T, K, R, D] -> [B, K, T * R, D], query row i = t * R + r, padded to whole blocks
    qr = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))
    qpos = jnp.repeat(q_positions.astype(jnp.int32), group, axis=1)  # [B, T * R]
    qpos = jnp.pad(qpos, ((0, 0), (0, padded - rows)), constant_values=-1)
    blocks_per_split = pl.cdiv(m // pages, splits)
    out_dtype = q.dtype if splits == 1 else jnp.float32
    kernel = functools.partial(_kernel, pages=pages, blocks_per_split=blocks_per_split, capacity=capacity,
                               scale=d**-0.5 if scale is None else scale, window=window)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, q_blocks, splits),
        in_specs=[
            pl.BlockSpec((None, None, block_q, d), lambda i, h, j, s: (i, h, j, 0)),
            pl.BlockSpec((None, block_q), lambda i, h, j, s: (i, j)),
            pl.BlockSpec((None, 1), lambda i, h, j, s: (i, 0)),
            pl.BlockSpec((None, m), lambda i, h, j, s: (i, 0)),
            pl.BlockSpec((num_pages, page_size, None, d), lambda i, h, j, s: (0, 0, h, 0)),
            pl.BlockSpec((num_pages, page_size, None, d), lambda i, h, j, s: (0, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_q, d), lambda i, h, j, s: (s, i, h, j, 0)),
            pl.BlockSpec((None, None, None, block_q), lambda i, h, j, s: (s, i, h, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((splits, b, kv_heads, padded, d), out_dtype),
                   jax.ShapeDtypeStruct((splits, b, kv_heads, padded), jnp.float32)],
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(qr, qpos, kv_lengths.astype(jnp.int32)[:, None], block_table.astype(jnp.int32), k_pages, v_pages)
    if splits == 1:
        out, lse = o[0], lse[0]
    else:  # merge the splits' partial softmaxes
        top = jnp.max(lse, axis=0)  # [B, K, rows]
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - top), 0.0)
        total = jnp.sum(weight, axis=0)
        out = jnp.einsum("sbkq,sbkqd->bkqd", weight, o) / jnp.where(total > 0, total, 1.0)[..., None]
        lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    out = out[:, :, :rows].reshape(b, kv_heads, t, group, d).transpose(0, 2, 1, 3, 4)
    out = out.reshape(b, t, n, d).astype(q.dtype)
    if not return_lse:
        return out
    return out, lse[:, :, :rows].reshape(b, kv_heads, t, group).transpose(0, 2, 1, 3).reshape(b, t, n)
