"""The entry point: ragged paged attention on the current backend.

`implementation="pallas"` runs the Pallas kernel: on a GPU compiled through Triton (for the
shapes `unsupported` does not name), on a TPU compiled through Mosaic, elsewhere the GPU kernel
in interpret mode (slow; for tests, which run the TPU kernel on its interpreter too). `"xla"`
runs the jnp reference.
"""

from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention import gpu, reference, tpu
from pallas_kernels.ragged_paged_attention.gpu import unsupported
from pallas_kernels.ragged_paged_attention.tuning import pick_blocks, tpu_pages

IMPLEMENTATIONS = ("pallas", "xla")
__all__ = ["IMPLEMENTATIONS", "ragged_paged_attention", "unsupported"]


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                           q_positions: jax.Array, kv_lengths: jax.Array, *, implementation: str = "pallas",
                           blocks: gpu.Blocks | None = None, return_lse: bool = False, scale: float | None = None,
                           window: int | None = None):
    """Attention of each row's queries over its pages (`reference.ragged_paged_attention` says
    what it computes). q: [B, T, N, D]; k_pages, v_pages: [P, page_size, K, D]; block_table:
    [B, M] int32; q_positions: [B, T] int32; kv_lengths: [B] int32. Returns [B, T, N, D], and
    with return_lse each query's log-sum-exp [B, T, N] too. scale: of the scores (default
    1/sqrt(D)); window: a sliding window's length (None: none). blocks: the GPU kernel's block
    sizes (default: `tuning.pick_blocks`; the TPU kernel's come from `tuning.tpu_pages`)."""
    if implementation == "xla":
        return reference.ragged_paged_attention(q, k_pages, v_pages, block_table, q_positions, kv_lengths,
                                                return_lse, scale, window)
    if implementation != "pallas":
        raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    b, t, n, d = q.shape
    kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    if backend == "tpu":
        return tpu.ragged_paged_attention(q, k_pages, v_pages, block_table, q_positions, kv_lengths,
                                          pages=tpu_pages(page_size, block_table.shape[1]), return_lse=return_lse,
                                          scale=scale, window=window)
    if backend == "gpu" and (why := unsupported(d, page_size, k_pages.dtype.itemsize)):
        raise ValueError(f"the ragged paged attention kernel cannot run here: {why}; use implementation='xla'")
    if blocks is None:
        blocks = pick_blocks(batch=b, kv_heads=kv_heads, query_rows=t * (n // kv_heads), head_dim=d,
                             page_size=page_size, table_columns=block_table.shape[1], itemsize=q.dtype.itemsize)
    return gpu.ragged_paged_attention(q, k_pages, v_pages, block_table, q_positions, kv_lengths, blocks=blocks,
                                      interpret=backend != "gpu", return_lse=return_lse, scale=scale, window=window)
