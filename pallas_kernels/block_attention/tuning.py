"""Block sizes of the GPU kernels, from the shapes of a call (not yet swept on a GPU: the rows
of a tile are whole blocks, at least 64 (32 for heads wider than 128), and the keys per step
shrink as the head dim grows so that a step's keys and values fit the shared memory of an H200
with two pipeline stages)."""

from __future__ import annotations

from pallas_kernels.block_attention.gpu import Blocks

KEYS_PER_STEP = {64: 64, 128: 64, 256: 32, 512: 16}  # head dim -> context keys per inner step


def pick_blocks(*, slots: int, head_dim: int) -> Blocks:
    """Blocks for blocks of `slots` rows (a power of two) and heads of `head_dim`."""
    block_q = max(64 if head_dim <= 128 else 32, slots)
    return Blocks(block_q=block_q, block_k=KEYS_PER_STEP.get(head_dim, 32), num_warps=4 if head_dim <= 64 else 8)
