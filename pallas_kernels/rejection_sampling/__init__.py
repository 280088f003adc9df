"""Fused speculative rejection sampling: the accepted prefix and the residual or bonus token of
each row, from the target's logits (softmax fused, never written), one pass per logit row."""

from pallas_kernels.rejection_sampling.ops import IMPLEMENTATIONS, rejection_sample

__all__ = ["IMPLEMENTATIONS", "rejection_sample"]
