"""Block attention of drafter training: each anchor's block of gamma slots attends to the context
strictly before its anchor and, bidirectionally, to its own block (DSpark's and DFlash's mask),
with grouped-query heads; forward and backward never build the [slots, keys] scores."""

from pallas_kernels.block_attention.ops import IMPLEMENTATIONS, block_attention

__all__ = ["IMPLEMENTATIONS", "block_attention"]
