"""The block drafters' training loss over one chunk of vocabulary-sized logits fused: both
softmaxes, the cross-entropy, the L1 distance and the loss's gradient in three streaming passes
over each row (two without the L1 term's gradient)."""

from pallas_kernels.vocab_loss.ops import IMPLEMENTATIONS, loss_and_grad

__all__ = ["IMPLEMENTATIONS", "loss_and_grad"]
