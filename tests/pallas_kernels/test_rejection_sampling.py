"""Fused rejection sampling: the jnp reference gives the tokens of `decoding.rejection.verify`
from the same keys, and the Pallas kernels (the GPU kernel interpreted on CPU and compiled with
`-m gpu`, the TPU kernels on the TPU interpreter) give the reference's tokens from the same
uniforms and noise, on ragged batches: rows verifying nothing (L = 0), everything (L = G) or a
part, greedy rows beside rows at T = 1 and 0.6, vocabularies that end inside a kernel tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding.rejection import ACCEPT_STREAM, NEXT_STREAM, verify
from dspark_jax.sampling import SamplingParams, fold, probabilities
from jax.experimental.pallas import tpu as pltpu
from pallas_kernels.rejection_sampling import gpu, rejection_sample, reference, tpu
from pallas_kernels.lowering import lower

on_gpu = jax.default_backend() == "gpu"
TPU_INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise")


def round_inputs(seed, *, rows, gamma, vocab, temperatures, closeness=2.0):
    """A verify round: target logits [B, G + 1, V], draft distributions q near the target's
    (so that drafts are often accepted) with tokens drawn from them, random verify lengths
    (0 and G among them), and the round's keys."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, gamma + 1, vocab)).astype(np.float32) * 3
    temperature = np.asarray([temperatures[i % len(temperatures)] for i in range(rows)], np.float32)
    draft_logits = logits[:, :gamma] + rng.standard_normal((rows, gamma, vocab)).astype(np.float32) / closeness
    q = np.asarray(probabilities(jnp.asarray(draft_logits), SamplingParams(temperature=temperature[:, None])))
    tokens = np.stack([[rng.choice(vocab, p=q[b, j] / q[b, j].sum()) for j in range(gamma)] for b in range(rows)])
    lengths = rng.integers(0, gamma + 1, rows)
    lengths[:2] = [0, gamma]
    keys = jax.random.split(jax.random.key(seed), rows)
    return (jnp.asarray(logits), jnp.asarray(temperature), jnp.asarray(q), jnp.asarray(tokens, jnp.int32),
            jnp.asarray(lengths, jnp.int32), keys)


def noise(keys, gamma, vocab):
    """The uniforms and Gumbel noise `verify` draws from a round's keys."""
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (gamma,), jnp.float32))(fold(keys, ACCEPT_STREAM))
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(fold(keys, NEXT_STREAM))
    return uniforms, gumbel


def kernel_args(logits, temperature, q, tokens, lengths, keys):
    q_tokens = jnp.take_along_axis(q, tokens[..., None], axis=-1)[..., 0]
    return (logits, temperature, q, q_tokens, tokens, lengths, *noise(keys, tokens.shape[1], logits.shape[-1]))


CASES = {  # id: round_inputs arguments
    "mixed-temperatures": dict(rows=12, gamma=4, vocab=300, temperatures=[1.0, 0.0, 0.6]),
    "greedy": dict(rows=6, gamma=3, vocab=257, temperatures=[0.0]),
    "long-block": dict(rows=8, gamma=8, vocab=96, temperatures=[1.0, 0.6], closeness=4.0),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_gives_the_tokens_of_verify(case):
    logits, temperature, q, tokens, lengths, keys = round_inputs(0, **CASES[case])
    p = probabilities(logits, SamplingParams(temperature=temperature[:, None]))
    want = verify(keys, tokens, q, p, lengths)
    got = reference.rejection_sample(*kernel_args(logits, temperature, q, tokens, lengths, keys))
    np.testing.assert_array_equal(got[0], want.accepted)
    np.testing.assert_array_equal(got[1], want.next_token)
    accepted = np.asarray(want.accepted)
    assert accepted[0] == 0 and (accepted == np.asarray(lengths)).any() and (accepted < np.asarray(lengths)).any()


@pytest.mark.parametrize("tile,num_splits", [(32, None), (32, 3), pytest.param(128, None, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", CASES)
def test_kernel_gives_the_reference_tokens(case, tile, num_splits):
    """The GPU kernels, interpreted: by default as many vocabulary slices as tiles here (a
    slice per tile), or 3 slices of several tiles, the last one shorter."""
    args = kernel_args(*round_inputs(1, **CASES[case]))
    got = gpu.rejection_sample(*args, tile=tile, interpret=not on_gpu, num_splits=num_splits)
    want = reference.rejection_sample(*args)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("tile", [128, 256])
@pytest.mark.parametrize("case", CASES)
def test_tpu_kernel_gives_the_reference_tokens(case, tile):
    """The Mosaic kernels on the TPU interpreter, which raises on any read out of bounds
    (vocabularies of 300, 257 and 96: a last tile that overhangs, or one narrower than a tile)."""
    args = kernel_args(*round_inputs(1, **CASES[case]))
    got = tpu.rejection_sample(*args, tile=tile, interpret=TPU_INTERPRET)
    want = reference.rejection_sample(*args)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_a_residual_without_mass_falls_back_to_the_target():
    """Where rounding leaves max(p - q, 0) all zero after a rejection (q = p here, and the
    uniform made to reject), the next token comes from p, as in `verify`."""
    logits, temperature, q, tokens, lengths, keys = round_inputs(2, rows=4, gamma=2, vocab=64, temperatures=[1.0])
    q = probabilities(logits[:, :2], SamplingParams(temperature=1.0)) * 1.5  # q >= p everywhere: no residual
    q_tokens = jnp.take_along_axis(q, tokens[..., None], axis=-1)[..., 0]
    uniforms, gumbel = noise(keys, 2, 64)
    args = (logits, temperature, q, q_tokens, tokens, jnp.full((4,), 2, jnp.int32), jnp.full_like(uniforms, 0.99),
            gumbel)
    accepted, next_token = rejection_sample(*args, tile=32)
    want = reference.rejection_sample(*args)
    np.testing.assert_array_equal(accepted, want[0])
    np.testing.assert_array_equal(next_token, want[1])
    on_tpu_interpreter = tpu.rejection_sample(*args, tile=128, interpret=TPU_INTERPRET)
    np.testing.assert_array_equal(np.asarray(on_tpu_interpreter[1]), np.asarray(want[1]))
    assert np.all(np.asarray(accepted) == 0)
    p0 = reference.target_probabilities(logits, temperature)[:, 0]
    np.testing.assert_array_equal(next_token, jnp.argmax(jnp.log(p0) + gumbel, axis=-1))


def test_ties_across_vocabulary_slices_go_to_the_lowest_index():
    """Greedy rows whose largest logit appears twice, in different slices of the GPU kernel
    (96 entries, tiles of 32, 3 slices): the argmax is the first one, as jnp.argmax's, both for
    the acceptance test (a draft of the later one is rejected) and for the next token."""
    rows, gamma, vocab = 4, 1, 96
    logits = jnp.zeros((rows, gamma + 1, vocab), jnp.float32).at[:, :, 10].set(5.0).at[:, :, 70].set(5.0)
    tokens = jnp.asarray([[10], [70], [10], [70]], jnp.int32)
    q = jax.nn.one_hot(tokens, vocab, dtype=jnp.float32)
    args = (logits, jnp.zeros((rows,)), q, jnp.ones((rows, gamma)), tokens, jnp.asarray([1, 1, 0, 0], jnp.int32),
            jnp.full((rows, gamma), 0.5), jnp.zeros((rows, vocab)))
    want = reference.rejection_sample(*args)
    np.testing.assert_array_equal(want[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(want[1], [10, 10, 10, 10])
    got = gpu.rejection_sample(*args, tile=32, interpret=not on_gpu, num_splits=3)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
    with pytest.raises(ValueError, match="num_splits must be at least 1, got 0"):
        gpu.rejection_sample(*args, tile=32, interpret=not on_gpu, num_splits=0)


def test_unknown_implementation_is_refused():
    args = kernel_args(*round_inputs(3, rows=2, gamma=2, vocab=16, temperatures=[1.0]))
    with pytest.raises(ValueError, match="implementation 'cuda' is not one of"):
        rejection_sample(*args, implementation="cuda")


def test_kernels_lower_for_gpu_and_tpu():
    """Triton's and Mosaic's lowering rules accept the kernels for Qwen3's vocabulary, gamma 7,
    256 rows."""
    b, g, v = 256, 7, 151936
    shape = lambda *dims, dtype=jnp.float32: jax.ShapeDtypeStruct(dims, dtype)
    args = (shape(b, g + 1, v, dtype=jnp.bfloat16), shape(b), shape(b, g, v), shape(b, g), shape(b, g, dtype=jnp.int32),
            shape(b, dtype=jnp.int32), shape(b, g), shape(b, v))
    lowered = lower(gpu.rejection_sample, *args, platform="cuda")
    assert "rejection_scan" in lowered and "rejection_draw" in lowered
    assert "tpu_custom_call" in lower(tpu.rejection_sample, *args, platform="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_gives_the_reference_tokens_on_gpu(dtype):
    """Qwen3's vocabulary (151,936: not a multiple of the tile), gamma 7, 64 rows."""
    logits, temperature, q, tokens, lengths, keys = round_inputs(4, rows=64, gamma=7, vocab=151936,
                                                                 temperatures=[1.0, 0.0, 0.6])
    args = kernel_args(logits.astype(dtype), temperature, q, tokens, lengths, keys)
    got = rejection_sample(*args)
    want = reference.rejection_sample(*args)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert np.mean(np.asarray(got[1]) == np.asarray(want[1])) >= 0.98  # the sums run in another order


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_first_committed_token_follows_the_target(temperature):
    """Losslessness through the kernel (interpreted): 8192 rounds of one verify block, each
    with its own draft tokens drawn from q and its own keys; the first token a round commits
    (d_1 if accepted, else the residual token) has the target's law p_0: chi-square over the
    8 tokens, p >= 1e-3 (a total-variation error of 0.03 is caught with probability > 0.99)."""
    from scipy import stats

    rows, gamma, vocab = 8192, 3, 8
    rng = np.random.default_rng(5)
    logits = jnp.broadcast_to(jnp.asarray(rng.standard_normal((1, gamma + 1, vocab)) * 2, jnp.float32),
                              (rows, gamma + 1, vocab))
    q_one = probabilities(jnp.asarray(rng.standard_normal((gamma, vocab)) * 2, jnp.float32),
                          SamplingParams(temperature=temperature))
    q = jnp.broadcast_to(q_one, (rows, gamma, vocab))
    keys = jax.random.split(jax.random.key(6), rows)
    tokens = jax.vmap(lambda k: jax.vmap(jax.random.categorical)(jax.random.split(k, gamma), jnp.log(q_one)))(keys)
    args = kernel_args(logits, jnp.full((rows,), temperature, jnp.float32), q, tokens.astype(jnp.int32),
                       jnp.full((rows,), gamma, jnp.int32), jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    accepted, next_token = map(np.asarray, rejection_sample(*args, tile=8))
    first = np.where(accepted > 0, np.asarray(tokens)[:, 0], next_token)
    p0 = np.asarray(reference.target_probabilities(logits[:1], jnp.full((1,), temperature)))[0, 0].astype(np.float64)
    counts = np.bincount(first, minlength=vocab)
    assert stats.chisquare(counts, p0 / p0.sum() * rows).pvalue >= 1e-3
    assert 0.05 < np.mean(accepted > 0) < 0.95  # both ways of committing the first token occur
