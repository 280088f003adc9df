"""Fused draft-slot sampling: the jnp reference draws from exactly the distribution it returns
and equals `dspark_jax.sampling`'s (probabilities, draw) up to the rounding of log q; the
Pallas kernels (the GPU kernel interpreted on CPU and compiled with `-m gpu`, the TPU kernel on
the TPU interpreter) give the reference's q and tokens from the same noise, with and without a
Markov bias, for greedy rows beside rows at T = 1 and 0.6, batches that end inside a row block
and vocabularies that end inside a tile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.sampling import SamplingParams, draw, gumbel, probabilities
from jax.experimental.pallas import tpu as pltpu
from pallas_kernels.markov_sampling import gpu, markov_sample, reference, tpu, unsupported
from pallas_kernels.markov_sampling.gpu import Blocks
from pallas_kernels.markov_sampling.ops import finish
from pallas_kernels.markov_sampling.tuning import pick_blocks
from pallas_kernels.lowering import lower

on_gpu = jax.default_backend() == "gpu"
TPU_INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise")


def slot_inputs(seed, *, rows, vocab, rank, temperatures, dtype=jnp.float32):
    """(base [B, V], temperature [B], noise [B, V], vec [B, R] or None, w2 [V, R] or None) and
    the rows' keys the noise came from."""
    rng = np.random.default_rng(seed)
    base = jnp.asarray(rng.standard_normal((rows, vocab)) * 3, dtype)
    temperature = jnp.asarray([temperatures[i % len(temperatures)] for i in range(rows)], jnp.float32)
    keys = jax.random.split(jax.random.key(seed), rows)
    vec = w2 = None
    if rank:
        vec = jnp.asarray(rng.standard_normal((rows, rank)), jnp.bfloat16)
        w2 = jnp.asarray(rng.standard_normal((vocab, rank)) * 0.2, jnp.bfloat16)
    return (base, temperature, gumbel(keys, vocab), vec, w2), keys


CASES = {  # id: slot_inputs arguments
    "markov-mixed": dict(rows=5, vocab=300, rank=16, temperatures=[1.0, 0.0, 0.6]),
    "markov-two-row-blocks": dict(rows=20, vocab=257, rank=32, temperatures=[0.6, 1.0, 0.0]),
    "no-bias": dict(rows=3, vocab=200, rank=0, temperatures=[1.0, 0.0]),
}
BLOCKS = {"default": None, "splits": Blocks(rows=16, tile=32, splits=3),
          "one-split": Blocks(rows=16, tile=64, splits=1)}


def test_reference_is_the_sampling_modules_law():
    """q is `probabilities` of the biased logits, and the tokens are `draw`'s from the same keys
    (the Gumbel-max over z / T instead of log q: equal but for a rounding tie)."""
    (base, temperature, noise, vec, w2), keys = slot_inputs(0, **CASES["markov-mixed"])
    q, tokens = reference.markov_sample(base, temperature, noise, vec, w2)
    logits = base + jnp.einsum("br,vr->bv", vec, w2, preferred_element_type=jnp.float32)
    want_q = probabilities(logits, SamplingParams(temperature=temperature))
    np.testing.assert_allclose(q, want_q, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(tokens, draw(keys, want_q))


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_gives_the_reference_distribution_and_tokens(case, blocks):
    args, _ = slot_inputs(1, **CASES[case])
    q, tokens = markov_sample(*args, blocks=BLOCKS[blocks])
    want_q, want_tokens = reference.markov_sample(*args)
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(tokens, want_tokens)
    greedy = np.asarray(args[1]) == 0
    assert np.all(np.asarray(q)[greedy].max(axis=1) == 1.0)  # one-hot rows at T = 0


@pytest.mark.parametrize("tile", [128, 256])
@pytest.mark.parametrize("case", CASES)
def test_tpu_kernel_gives_the_reference_distribution_and_tokens(case, tile):
    """The Mosaic kernel on the TPU interpreter, which raises on any read out of bounds."""
    args, _ = slot_inputs(1, **CASES[case])
    q, tokens = finish(args[1], *tpu.markov_sample(*args, tile=tile, interpret=TPU_INTERPRET))
    want_q, want_tokens = reference.markov_sample(*args)
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(tokens, want_tokens)


def test_tokens_follow_the_returned_distribution():
    """The law: 4096 rows of one slot (same logits and bias, own noise), interpreted kernel; the
    tokens' counts against q: chi-square over 8 tokens, p >= 1e-3 (a total-variation error of
    0.05 is caught with probability > 0.99)."""
    rows, vocab = 4096, 8
    (base, _, _, vec, w2), _ = slot_inputs(2, rows=1, vocab=vocab, rank=16, temperatures=[1.0])
    keys = jax.random.split(jax.random.key(3), rows)
    temperature = jnp.full((rows,), 0.6, jnp.float32)
    q, tokens = markov_sample(jnp.broadcast_to(base, (rows, vocab)), temperature, gumbel(keys, vocab),
                              jnp.broadcast_to(vec, (rows, 16)), w2, blocks=Blocks(rows=64, tile=8, splits=1))
    q0 = np.asarray(q[0], np.float64)
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert stats.chisquare(counts, q0 / q0.sum() * rows).pvalue >= 1e-3


def test_bad_arguments_are_refused():
    (base, temperature, noise, vec, w2), _ = slot_inputs(4, rows=2, vocab=16, rank=16, temperatures=[1.0])
    with pytest.raises(ValueError, match="both vec and w2"):
        markov_sample(base, temperature, noise, vec, None)
    with pytest.raises(ValueError, match="implementation 'cuda' is not one of"):
        markov_sample(base, temperature, noise, vec, w2, implementation="cuda")
    assert "power of two" in unsupported(48) and "power of two" in unsupported(8) and unsupported(256) is None


@pytest.mark.parametrize("rank", [0, 256])
def test_kernels_lower_for_gpu_and_tpu(rank):
    """Qwen3's vocabulary and DSpark's rank (or DFlash's none), 100 rows: Triton's and Mosaic's
    lowering rules accept both kernels."""
    b, v = 100, 151936
    shape = lambda *dims, dtype=jnp.float32: jax.ShapeDtypeStruct(dims, dtype)
    args = (shape(b, v), shape(b), shape(b, v)) + ((shape(b, rank, dtype=jnp.bfloat16),
                                                    shape(v, rank, dtype=jnp.bfloat16)) if rank else ())
    blocks = pick_blocks(batch=b, vocab=v, bias=bool(rank))
    assert "markov_sample" in lower(functools.partial(gpu.markov_sample, blocks=blocks), *args, platform="cuda")
    assert "tpu_custom_call" in lower(tpu.markov_sample, *args, platform="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU")
@pytest.mark.parametrize("rank", [0, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_gives_the_reference_on_gpu(rank, dtype):
    """Qwen3's vocabulary (151,936: not a multiple of the tile), 100 rows (not a multiple of
    the row block), DSpark's rank 256 or none (DFlash)."""
    args, _ = slot_inputs(5, rows=100, vocab=151936, rank=rank, temperatures=[1.0, 0.0, 0.6], dtype=dtype)
    q, tokens = markov_sample(*args)
    want_q, want_tokens = reference.markov_sample(*args)
    np.testing.assert_allclose(q, want_q, rtol=1e-4, atol=1e-7)
    assert np.mean(np.asarray(tokens) == np.asarray(want_tokens)) >= 0.98  # the sums run in another order
