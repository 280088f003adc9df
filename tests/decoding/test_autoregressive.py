"""The cached autoregressive loop against naive decoding with full forwards."""

import jax
import numpy as np
import pytest
from scipy import stats

from dspark_jax import load_target
from dspark_jax.decoding.generate import generate_autoregressive
from dspark_jax.sampling import SamplingParams, probabilities
from tests.helpers import tiny_path


@pytest.fixture(scope="module")
def target():
    return load_target(tiny_path("llama_gqa_llama3rope"), dtype="float32")


def naive_greedy(target, prompt, n, stop_ids=()):
    """Argmax of a full causal forward per step (right padding to 32 keeps one compilation)."""
    seq = list(prompt)
    forward = jax.jit(target.forward)
    for _ in range(n):
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(seq)] = seq
        logits, _, _ = forward(target.params, padded)
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
        if seq[-1] in stop_ids:
            break
    return seq[len(prompt):]


PROMPTS = [[5, 17, 3], [99, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]


def test_greedy_equals_naive_decoding(target):
    out = generate_autoregressive(target, PROMPTS, max_new_tokens=9, sampling=SamplingParams(0.0), stop_ids=())
    assert out == [naive_greedy(target, p, 9) for p in PROMPTS]


def test_stop_token_ends_a_sequence_and_is_kept(target):
    free = naive_greedy(target, PROMPTS[1], 9)
    stop = free[4]
    first = free.index(stop)
    out = generate_autoregressive(target, PROMPTS, max_new_tokens=9, sampling=SamplingParams(0.0), stop_ids=(stop,))
    assert out[1] == free[: first + 1]
    for prompt, got in zip(PROMPTS, out):
        assert got == naive_greedy(target, prompt, 9, stop_ids=(stop,))


def test_first_token_distribution_and_independent_rows(target):
    """4096 copies of one prompt: the first tokens are i.i.d. draws from the target's distribution."""
    params = SamplingParams(temperature=0.8, top_p=0.9)
    prompt = PROMPTS[0]
    logits, _, _ = target.forward(target.params, np.asarray([prompt], np.int32))
    probs = np.asarray(probabilities(logits[0, -1], params), np.float64)
    expected = probs / probs.sum() * 4096
    out = generate_autoregressive(target, [prompt] * 4096, max_new_tokens=1, sampling=params, seed=11)
    counts = np.bincount([o[0] for o in out], minlength=target.config.vocab_size)
    assert counts[expected == 0].sum() == 0
    big = expected >= 5  # pool rare tokens into one chi-square bin
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    _, p_value = stats.chisquare(obs[exp > 0], exp[exp > 0])
    assert p_value > 1e-3, p_value
    assert len({tuple(o) for o in out}) > 1


def test_seeds(target):
    params = SamplingParams(temperature=1.0)
    a = generate_autoregressive(target, PROMPTS, max_new_tokens=6, sampling=params, seed=1, stop_ids=())
    b = generate_autoregressive(target, PROMPTS, max_new_tokens=6, sampling=params, seed=1, stop_ids=())
    c = generate_autoregressive(target, PROMPTS, max_new_tokens=6, sampling=params, seed=2, stop_ids=())
    assert a == b and a != c


@pytest.mark.parametrize(
    "prompts,max_new,match",
    [([[]], 4, "prompt 0 is empty"), ([], 4, "no prompts"), ([[1] * 2046], 4, "exceeds the model's context"),
     ([[1, 144]], 4, "token id 144 outside the vocabulary"), ([[1]], 0, "max_new_tokens")],
)
def test_bad_input(target, prompts, max_new, match):
    with pytest.raises(ValueError, match=match):
        generate_autoregressive(target, prompts, max_new_tokens=max_new)
