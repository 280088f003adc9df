"""AdamW with the reference schedule: linear warmup, then cosine to zero (reference 6.1).

For 0-based update s, peak eta and W = int(warmup_ratio * T) warmup updates out of T:
    lr(s) = eta * (s + 1) / W                                 for s < W
    lr(s) = eta * (1 + cos(pi * (s - W) / (T - W))) / 2        for s >= W
Gradients are clipped to a global L2 norm first. The optimizer sees only the trainable
parameters (fp32 master copies); the frozen embedding and LM head never enter it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from dspark_jax.training.config import TrainConfig


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float):
    warmup = int(warmup_ratio * total_steps)
    decay = max(total_steps - warmup, 1)

    def lr(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * (s + 1) / max(warmup, 1)
        cosine = peak * 0.5 * (1 + jnp.cos(math.pi * jnp.clip(s - warmup, 0, decay) / decay))
        return jnp.where(s < warmup, warm, cosine)

    return lr


def make_optimizer(config: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, object]:
    """(optimizer, schedule) for a recipe."""
    schedule = lr_schedule(config.learning_rate, total_steps, config.warmup_ratio)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay),
    )
    return optimizer, schedule
