"""The fused attention of cache-free forwards on GPU against the reference masked attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.attention import cached_attention, sequence_attention


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on GPUs only")
def test_cudnn_sequence_attention_matches_masked_attention():
    b, t, n, k, d = 2, 384, 8, 2, 128
    keys = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(key, (b, t, h, d), jnp.float32) for key, h in zip(keys, (n, k, k)))
    fused = sequence_attention(q.astype(jnp.bfloat16), kk.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                               jnp.full((b,), t, jnp.int32), "cudnn")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    exact = cached_attention(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, jnp.full((b,), t))
    err = np.abs(np.asarray(fused, np.float32) - np.asarray(exact)).max()
    assert err <= 2e-2 * np.abs(np.asarray(exact)).max(), err  # bf16 inputs and output
