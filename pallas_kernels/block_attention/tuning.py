"""Block sizes of the GPU kernels, from the shapes of a call.

Heads of 128 take the fastest forward + backward of `scripts/bench_block_attention.py --sweep`
on an H100 at the Qwen3-4B recipe's shape: 128 query rows by 128 context keys a step, 8 warps,
2 pipeline stages (2.42 ms a layer, against 4.90 ms for the 64 x 64 blocks used before; 3
stages of 128 x 128 exceed the shared memory). Other head dims are not swept: their rows of a
tile are whole blocks, at least 64 (32 for heads wider than 128), and the keys per step shrink
as the head dim grows so that a step's keys and values fit the shared memory with two stages."""

from __future__ import annotations

from pallas_kernels.block_attention.gpu import Blocks

KEYS_PER_STEP = {64: 64, 128: 128, 256: 32, 512: 16}  # head dim -> context keys per inner step


def pick_blocks(*, slots: int, head_dim: int) -> Blocks:
    """Blocks for blocks of `slots` rows (a power of two) and heads of `head_dim`."""
    block_q = max(128 if head_dim == 128 else 64 if head_dim <= 128 else 32, slots)
    return Blocks(block_q=block_q, block_k=KEYS_PER_STEP.get(head_dim, 32), num_warps=4 if head_dim <= 64 else 8)
