"""Padding prompts into size buckets, so a few compiled programs serve every request."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_total: int, max_new_tokens: int) -> None:
    """Clear errors for empty, too long or out-of-vocabulary prompts."""
    if not prompts:
        raise ValueError("no prompts given")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > max_total:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's context of {max_total} positions"
            )
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B', T'] right-padded, lengths [B']) with B', T' rounded up to buckets; padding
    rows have length 0."""
    batch, width = bucket(len(prompts), 1), bucket(max(len(p) for p in prompts))
    tokens = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.zeros((batch,), np.int32)
    lengths[: len(prompts)] = [len(p) for p in prompts]
    return tokens, lengths
