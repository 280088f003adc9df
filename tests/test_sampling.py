"""Sampling distributions against a float64 numpy reference and a chi-square test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.sampling import SamplingParams, probabilities, sample


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top-k, then top-p (smallest prefix of the sorted probs reaching top_p)."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.zeros_like(p, bool)
        mass = 0.0
        for i in order:
            keep[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.5)]
)
def test_probabilities_match_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(6, 40)).astype(np.float32) * 3
    params = SamplingParams(temperature, top_k, top_p)
    ours = np.asarray(probabilities(jnp.asarray(logits), params))
    for row, ref_logits in zip(ours, logits):
        np.testing.assert_allclose(row, reference_probs(ref_logits, temperature, top_k, top_p), atol=1e-6)


def test_greedy_is_one_hot_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [5.0, 4.0, 4.9]])
    probs = probabilities(logits, SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(probs, [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(sample(jax.random.key(0), logits, SamplingParams(0.0)), [1, 0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 4, 1.0), (1.0, 0, 0.7)])
def test_samples_follow_the_distribution(temperature, top_k, top_p):
    """Chi-square goodness of fit over 40,000 draws; at alpha=1e-3 a correct sampler fails 0.1% of runs."""
    logits = np.random.default_rng(2).normal(size=(12,)).astype(np.float32)
    params = SamplingParams(temperature, top_k, top_p)
    draws = sample(jax.random.key(3), jnp.broadcast_to(jnp.asarray(logits), (40_000, 12)), params)
    counts = np.bincount(np.asarray(draws), minlength=12)
    expected = reference_probs(logits, temperature, top_k, top_p) * 40_000
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a filtered-out token"
    _, p_value = stats.chisquare(counts[support], expected[support])
    assert p_value > 1e-3, p_value


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
     (dict(temperature=None), "temperature"), (dict(top_p="0.5"), "top_p")],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_programs_over_sampling_params_compile_ahead_of_time():
    """Lowering and compiling ahead of time rebuilds SamplingParams from placeholders of its
    arrays; the compiled program then gives the jitted function's result."""
    params = SamplingParams.rows(3, temperature=[0.0, 0.5, 1.0], top_p=[1.0, 0.9, 0.5])
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 11)), jnp.float32)
    compiled = jax.jit(probabilities).lower(logits, params).compile()
    np.testing.assert_array_equal(compiled(logits, params), probabilities(logits, params))
