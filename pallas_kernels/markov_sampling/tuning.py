"""Block sizes for the GPU kernel, from the shapes of a call: row blocks as wide as the batch
(up to 64, so W2 is read at most once per 64 rows), and enough vocabulary splits to give the
chip two waves of programs."""

from __future__ import annotations

from pallas_kernels.markov_sampling.gpu import Blocks

TILE = 128  # vocabulary columns per step
MAX_ROWS = 64
TARGET_PROGRAMS = 264  # two waves of an H200's 132 multiprocessors


def pick_blocks(*, batch: int, vocab: int, bias: bool) -> Blocks:
    rows = min(MAX_ROWS, max(16 if bias else 1, 1 << (batch - 1).bit_length()))
    row_blocks = -(-batch // rows)
    tiles = -(-vocab // TILE)
    splits = max(1, min(tiles, TARGET_PROGRAMS // row_blocks))
    splits = -(-tiles // -(-tiles // splits))  # no split left without a tile
    return Blocks(rows, TILE, splits, num_warps=4 if rows * TILE <= 4096 else 8)
