"""Block sizes of the GPU kernels, from the shapes of a call.

Heads of 128 take the fastest forward + backward of `scripts/bench_block_attention.py --sweep`
on an H100 at the Qwen3-4B recipe's shape: 128 query rows by 128 context keys a step, 8 warps,
2 pipeline stages (2.42 ms a layer, against 4.90 ms for the 64 x 64 blocks used before; 3
stages of 128 x 128 exceed the shared memory). Other head dims are not swept: their rows of a
tile are whole blocks, at least 64 (32 for heads wider than 128), and the keys per step shrink
as the head dim grows so that a step's keys and values fit the shared memory with two stages.
Wider elements (float32) shrink both to the bytes of the swept bf16 tile: float32 128 x 128
tiles asked an H100 for 256 KiB of shared memory, which has 227 KiB."""

from __future__ import annotations

from pallas_kernels._common import pow2_at_most
from pallas_kernels.block_attention.gpu import Blocks

KEYS_PER_STEP = {64: 64, 128: 128, 256: 32, 512: 16}  # head dim -> context keys per inner step
TILE_BYTES = 128 * 128 * 2  # most bytes of a tile of query rows or of a step's keys (the swept bf16 tile)


def pick_blocks(*, slots: int, head_dim: int, itemsize: int = 2) -> Blocks:
    """Blocks for blocks of `slots` rows (a power of two) and heads of `head_dim` elements of
    `itemsize` bytes."""
    rows = max(16, pow2_at_most(TILE_BYTES // (head_dim * itemsize)))  # rows of a tile within TILE_BYTES
    block_q = max(min(128 if head_dim == 128 else 64 if head_dim <= 128 else 32, rows), slots)
    block_k = min(KEYS_PER_STEP.get(head_dim, 32), rows)
    return Blocks(block_q=block_q, block_k=block_k, num_warps=4 if head_dim <= 64 else 8)
