"""Block sizes for the kernels, from the shapes of a call.

GPU: the choices follow the measurements in docs/benchmarks.md ("Ragged paged attention"):
keys per inner step by head dim, 4 warps for the small query blocks of decoding and
verifying, and enough programs to fill the chip: when there are few rows, a row's pages are
split between programs, which matters most for long contexts. Rows of 16-bit elements that
fill the chip on their own take longer steps where that was measured faster (128 keys for a
head dim of 128); for split rows the measurements were mixed, and they keep the shorter
steps. TPU: a fixed number of keys per step, not yet tuned on a TPU.
"""

from __future__ import annotations

from pallas_kernels._common import pow2_at_most
from pallas_kernels.ragged_paged_attention.gpu import Blocks

KEYS_PER_STEP = {64: 128, 128: 64, 256: 32, 512: 16}  # head dim -> keys per inner step (default 64)
FILLED_KEYS_PER_STEP = {128: 128}  # the same where unsplit rows of 16-bit elements fill the chip
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
    programs = batch * kv_heads * -(-query_rows // block_q)
    split = programs < TARGET_PROGRAMS
    keys = KEYS_PER_STEP.get(head_dim, 64)
    if not split and itemsize == 2:
        keys = FILLED_KEYS_PER_STEP.get(head_dim, keys)
    pages = pow2_at_most(keys // page_size)
    pages = min(pages, 1 << (table_columns - 1).bit_length())  # no more than the table holds
    pages = max(pages, -(-16 // page_size))  # the smallest dot takes 16 keys
    splits = 1
    if split:
        splits = min(MAX_SPLITS, -(-table_columns // pages), pow2_at_most(TARGET_PROGRAMS // programs))
    return Blocks(block_q, pages, splits, num_warps=4 if block_q * head_dim <= 32 * 128 else 8)


TPU_KEYS_PER_STEP = 256  # keys per step of the TPU kernel (two MXU passes of 128)


def tpu_pages(page_size: int, table_columns: int) -> int:
    """Block-table columns per step of the TPU kernel: TPU_KEYS_PER_STEP keys, no more than the
    table holds."""
    return max(1, min(TPU_KEYS_PER_STEP // page_size, table_columns))
