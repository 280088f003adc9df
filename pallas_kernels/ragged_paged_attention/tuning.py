"""Block sizes for the kernels, from the shapes of a call.

GPU: the choices follow the sweeps in docs/benchmarks.md ("Ragged paged attention"): keys per
inner step by head dim (as many as fit a 32 KiB tile of keys), 4 warps for the small query
blocks of decoding and verifying, and enough programs to fill the chip: when there are few
rows, a row's pages are split between programs (which matters most for long contexts), with
shorter steps where the row has fewer steps than the splits wanted. TPU: a fixed number of
keys per step, not yet tuned on a TPU.
"""

from __future__ import annotations

from pallas_kernels._common import pow2_at_most
from pallas_kernels.ragged_paged_attention.gpu import Blocks

KEYS_PER_STEP = {64: 128, 128: 128, 256: 32, 512: 16}  # head dim -> keys per inner step (default 64)
KEY_TILE_BYTES = 32 * 1024  # most bytes of one step's keys (and as many of values) in shared memory
TARGET_PROGRAMS = 264  # two waves of an H200's 132 multiprocessors
MAX_SPLITS = 32


Q_TILE_BYTES = 64 * 1024  # most bytes of a query block in shared memory (the H100 has 227 KiB per block)


def pick_blocks(*, batch: int, kv_heads: int, query_rows: int, head_dim: int, page_size: int,
                table_columns: int, itemsize: int = 2) -> Blocks:
    """Blocks for `batch` rows of `query_rows` query rows per KV head (tokens x group), of
    `itemsize`-byte elements. The query block stays within Q_TILE_BYTES, which leaves room for
    two stages of key and value tiles: 64 rows of a 512-wide float32 head, with 16 keys a step,
    asked for 256 KiB on an H100 (docs/benchmarks.md)."""
    widest = max(16, pow2_at_most(Q_TILE_BYTES // (head_dim * itemsize)))
    block_q = min(64, widest, max(16, 1 << (query_rows - 1).bit_length()))
    keys = min(KEYS_PER_STEP.get(head_dim, 64), KEY_TILE_BYTES // (head_dim * itemsize))
    pages = pow2_at_most(keys // page_size)
    pages = min(pages, 1 << (table_columns - 1).bit_length())  # no more than the table holds
    fewest = -(-16 // page_size)  # the smallest dot takes 16 keys
    pages = max(pages, fewest)
    programs = batch * kv_heads * -(-query_rows // block_q)
    splits = 1
    if programs < TARGET_PROGRAMS:
        wanted = min(MAX_SPLITS, pow2_at_most(TARGET_PROGRAMS // programs))
        while pages > fewest and -(-table_columns // pages) < wanted:  # shorter steps, so more programs share a row
            pages //= 2
        splits = min(wanted, -(-table_columns // pages))
    return Blocks(block_q, pages, splits, num_warps=4 if block_q * head_dim <= 32 * 128 else 8)


TPU_KEYS_PER_STEP = 256  # keys per step of the TPU kernel (two MXU passes of 128)


def tpu_pages(page_size: int, table_columns: int) -> int:
    """Block-table columns per step of the TPU kernel: TPU_KEYS_PER_STEP keys, no more than the
    table holds."""
    return max(1, min(TPU_KEYS_PER_STEP // page_size, table_columns))
