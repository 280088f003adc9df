"""The fused chunk loss: the jnp reference against float64 numpy, and the Pallas kernel
(interpreted on CPU, compiled with `-m gpu` on a GPU) against the reference, on random logits
with a vocabulary that is not a whole number of tiles, rows that are not a whole number of
row blocks, labels at the vocabulary's first and last entries, weights of zero, and the
L1 term's gradient on and off. Its Triton lowering is checked at the Qwen3-4B vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.vocab_loss import gpu, loss_and_grad, reference
from pallas_kernels.lowering import lower

on_gpu = jax.default_backend() == "gpu"


def random_rows(seed, rows=7, vocab=1000, scale=4.0):
    rng = np.random.default_rng(seed)
    d = jnp.asarray(rng.standard_normal((rows, vocab)) * scale, jnp.float32)
    y = jnp.asarray(rng.standard_normal((rows, vocab)) * scale, jnp.float32)
    labels = rng.integers(0, vocab, rows)
    labels[0], labels[-1] = 0, vocab - 1
    a, b = rng.uniform(size=rows), rng.uniform(size=rows)
    a[1] = b[2] = 0.0
    return d, y, jnp.asarray(labels, jnp.int32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def numpy_loss_and_grad(d, y, labels, a, b):
    """float64: ce, l1 and the gradient of a ce + b l1 by d, from the definitions."""
    d, y, a, b = (np.asarray(x, np.float64) for x in (d, y, a, b))
    p = np.exp(d - d.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(y - y.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    rows = np.arange(len(labels))
    ce = -np.log(p[rows, labels])
    onehot = np.zeros_like(p)
    onehot[rows, labels] = 1.0
    # d l1 / d d_w = sum_v sign(p_v - q_v) p_v (1[v = w] - p_w)
    sign = np.sign(p - q)
    grad = a[:, None] * (p - onehot) + b[:, None] * p * (sign - (p * sign).sum(1, keepdims=True))
    return ce, np.abs(p - q).sum(1), grad


def test_reference_equals_float64():
    args = random_rows(0)
    for got, want in zip(reference.loss_and_grad(*args), numpy_loss_and_grad(*args)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


def test_reference_gradient_is_the_derivative_of_the_weighted_loss():
    d, y, labels, a, b = random_rows(1, rows=3, vocab=50, scale=1.0)
    weighted = lambda d: jnp.sum(a * reference.loss_and_grad(d, y, labels, a, b)[0]
                                 + b * reference.loss_and_grad(d, y, labels, a, b)[1])
    np.testing.assert_allclose(np.asarray(reference.loss_and_grad(d, y, labels, a, b)[2]),
                               np.asarray(jax.grad(weighted)(d)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("blocks", [gpu.Blocks(1, 128), gpu.Blocks(2, 256), gpu.Blocks(4, 64, 4)])
@pytest.mark.parametrize("l1_grad", [True, False])
def test_interpreted_kernel_equals_reference(blocks, l1_grad):
    d, y, labels, a, b = random_rows(2)
    b = b if l1_grad else jnp.zeros_like(b)
    got = loss_and_grad(d, y, labels, a, b, l1_grad=l1_grad, blocks=blocks)
    for x, want in zip(got, reference.loss_and_grad(d, y, labels, a, b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_gradient_in_bfloat16_is_the_reference_rounded():
    d, y, labels, a, b = random_rows(3)
    got = loss_and_grad(d, y, labels, a, b, out_dtype=jnp.bfloat16, blocks=gpu.Blocks(1, 256))[2]
    want = reference.loss_and_grad(d, y, labels, a, b)[2]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-6)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="implementation 'cuda'"):
        loss_and_grad(*random_rows(0), implementation="cuda")


def test_kernel_lowers_for_gpu():
    """Triton's lowering rules and MLIR's verifier accept the kernel at a chunk of 512 rows of
    the Qwen3-4B vocabulary (151,936 columns: not a whole number of tiles)."""
    sd = jax.ShapeDtypeStruct
    rows, vocab = 512, 151936
    args = (sd((rows, vocab), jnp.float32), sd((rows, vocab), jnp.float32), sd((rows,), jnp.int32),
            sd((rows,), jnp.float32), sd((rows,), jnp.float32))
    for l1_grad in (True, False):
        kernel = lambda *x: gpu.loss_and_grad(*x, out_dtype=jnp.bfloat16, l1_grad=l1_grad,
                                              blocks=gpu.Blocks(1, 4096, 8))
        assert "triton" in lower(kernel, *args, platform="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU")
@pytest.mark.parametrize("l1_grad", [True, False])
def test_compiled_kernel_equals_reference_on_gpu(l1_grad):
    d, y, labels, a, b = random_rows(4, rows=37, vocab=151936)
    b = b if l1_grad else jnp.zeros_like(b)
    got = loss_and_grad(d, y, labels, a, b, l1_grad=l1_grad)
    for x, want in zip(got, reference.loss_and_grad(d, y, labels, a, b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(want), rtol=1e-5, atol=1e-6)
