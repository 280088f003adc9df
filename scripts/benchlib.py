"""Hardware probes shared by the benchmark scripts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.evaluation.step_times import timed


def matmul_rate(n: int) -> float:
    """bf16 FLOP/s of an n x n x n matrix product on random data."""
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / timed(lambda: mm(a, b).block_until_ready())
