"""Ragged paged attention: each row's queries (a decode token, a verify block or a prefill
chunk) over the KV pages of its block table, causally, with grouped-query heads."""

from pallas_kernels.ragged_paged_attention.ops import IMPLEMENTATIONS, ragged_paged_attention, unsupported

__all__ = ["IMPLEMENTATIONS", "ragged_paged_attention", "unsupported"]
