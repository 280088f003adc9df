"""One draft slot's sampling step fused: logits plus DSpark's low-rank Markov bias, the
temperature, the softmax's running values and the Gumbel-max draw in one pass over the
vocabulary, then the draft distribution the acceptance test uses."""

from pallas_kernels.markov_sampling.ops import IMPLEMENTATIONS, markov_sample, unsupported

__all__ = ["IMPLEMENTATIONS", "markov_sample", "unsupported"]
