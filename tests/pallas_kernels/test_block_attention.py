"""Block attention of drafter training: the jnp reference against a float64 numpy loop, and the
Pallas kernels (the GPU kernels interpreted on CPU and compiled with `-m gpu` on a GPU, the TPU
kernels on the TPU interpreter, which raises on reads out of bounds) against the reference,
forward and gradients, on random blocks: anchors near the sequence's start (no context) and end
(the whole context), dropped blocks, gamma 4, 7 and 16 (16 fills a tile by itself), GQA groups
of 1 and 4, and a context that is not a whole number of key steps. The kernels' lowering for
the GPU and the TPU is checked at the Qwen3-4B recipe's shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_attention import block_attention, gpu, reference, tpu
from pallas_kernels.block_attention.tuning import pick_blocks
from pallas_kernels.lowering import lower

on_gpu = jax.default_backend() == "gpu"


def random_blocks(seed, *, batch=2, anchors=11, gamma=7, kv_heads=2, group=2, head_dim=16, context=150,
                  dtype=jnp.float32):
    """Arguments of block_attention: sorted anchors as training samples them, with the first
    block of row 0 at position 0 (no context), the last of row 1 at the end (the whole context)
    and about a fifth of the blocks dropped."""
    rng = np.random.default_rng(seed)
    n = kv_heads * group
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    ctx_len = np.sort(rng.integers(0, context + 1, (batch, anchors)), axis=1)
    ctx_len[0, 0], ctx_len[-1, -1] = 0, context
    keep = rng.random((batch, anchors)) < 0.8
    keep[0, 0] = keep[-1, -1] = True
    return (normal(batch, anchors, gamma, n, head_dim), normal(batch, kv_heads, context, head_dim),
            normal(batch, kv_heads, context, head_dim), jnp.asarray(ctx_len, jnp.int32),
            normal(batch, anchors, gamma, kv_heads, head_dim), normal(batch, anchors, gamma, kv_heads, head_dim),
            jnp.asarray(keep))


def numpy_block_attention(q, k_ctx, v_ctx, ctx_len, k_blk, v_blk, keep):
    """float64 loops: each slot of a kept block over the context before its anchor and its block."""
    q, k_ctx, v_ctx, k_blk, v_blk = (np.asarray(x, np.float64) for x in (q, k_ctx, v_ctx, k_blk, v_blk))
    b, a, g, n, d = q.shape
    group = n // k_ctx.shape[1]
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(a):
            if not keep[i, j]:
                continue
            for h in range(n):
                kh = h // group
                keys = np.concatenate([k_ctx[i, kh, : ctx_len[i, j]], k_blk[i, j, :, kh]])
                values = np.concatenate([v_ctx[i, kh, : ctx_len[i, j]], v_blk[i, j, :, kh]])
                scores = q[i, j, :, h] @ keys.T / np.sqrt(d)  # [G, keys]
                probs = np.exp(scores - scores.max(axis=1, keepdims=True))
                out[i, j, :, h] = (probs / probs.sum(axis=1, keepdims=True)) @ values
    return out


def test_reference_equals_a_float64_loop():
    args = random_blocks(0)
    np.testing.assert_allclose(reference.block_attention(*args), numpy_block_attention(*args), atol=2e-5)


CASES = {"gamma7-gqa2": {}, "gamma4-gqa4": {"gamma": 4, "kv_heads": 1, "group": 4},
         "gamma16-mha": {"gamma": 16, "kv_heads": 2, "group": 1, "anchors": 6, "context": 64}}


def gradients(args, implementation, backend=None):
    """Gradients of a random projection of the output, for q and the four key/value arrays."""
    cotangent = jax.random.normal(jax.random.key(1), args[0].shape, jnp.float32)

    def loss(q, k_ctx, v_ctx, k_blk, v_blk):
        out = block_attention(q, k_ctx, v_ctx, args[3], k_blk, v_blk, args[6], implementation=implementation,
                              backend=backend)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.grad(loss, argnums=range(5))(*args[:3], *args[4:6])


KERNEL_CASES = [(case, "gpu") for case in CASES] + [  # the TPU interpreter's gamma 4 and 16: slow set
    (case, "tpu") if case == "gamma7-gqa2" else pytest.param(case, "tpu", marks=pytest.mark.slow) for case in CASES]


@pytest.mark.parametrize("case,backend", KERNEL_CASES)
def test_kernels_equal_reference_forward_and_gradients(case, backend):
    args = random_blocks(2, **CASES[case])
    out = block_attention(*args, implementation="pallas", backend=backend)
    np.testing.assert_allclose(out, reference.block_attention(*args), atol=2e-5)
    assert np.all(np.asarray(out)[~np.asarray(args[6])] == 0)  # dropped blocks output zeros
    for got, want in zip(gradients(args, "pallas", backend), gradients(args, "xla")):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


def test_context_keys_are_scheduled_to_the_tiles_that_see_them():
    """backward_context visits, for each step of context keys, exactly the query tiles whose
    reach passes the step's first key (blocks in any order)."""
    ctx = jnp.asarray([[0, 0, 5, 5, 200, 200, 64, 64, 65, 65, 0, 0]], jnp.int32)  # 6 tiles of 2 rows
    tiles, counts = gpu.context_schedule(ctx, block_q=2, block_k=64, steps=4)
    assert counts[0, :, 0].tolist() == [4, 2, 1, 1]
    assert [sorted(tiles[0, j, : counts[0, j, 0]].tolist()) for j in range(4)] == [[1, 2, 3, 4], [2, 4], [2], [2]]


def test_tuning_takes_whole_blocks_per_tile():
    assert pick_blocks(slots=8, head_dim=128) == gpu.Blocks(block_q=128, block_k=128, num_warps=8)
    # float32 halves the tiles to the bf16 tile's bytes (128 x 128 asked an H100 for 256 KiB of shared memory)
    assert pick_blocks(slots=8, head_dim=128, itemsize=4) == gpu.Blocks(block_q=64, block_k=64, num_warps=8)
    assert pick_blocks(slots=8, head_dim=64, itemsize=4) == pick_blocks(slots=8, head_dim=64)
    assert pick_blocks(slots=16, head_dim=256).block_q == 32
    assert pick_blocks(slots=128, head_dim=64).block_q == 128


def test_unknown_implementation_or_backend_is_refused():
    with pytest.raises(ValueError, match="'cuda' is not one of"):
        block_attention(*random_blocks(0), implementation="cuda")
    with pytest.raises(ValueError, match="backend 'cpu' is not 'gpu' or 'tpu'"):
        block_attention(*random_blocks(0), backend="cpu")


def _row_layout_args(batch, anchors, slots, heads, kv_heads, head_dim, context, dtype):
    rows = anchors * slots
    sd = jax.ShapeDtypeStruct
    return (sd((batch, heads, rows, head_dim), dtype), sd((batch, rows), jnp.int32), sd((batch, rows), jnp.int32),
            sd((batch, kv_heads, context, head_dim), dtype), sd((batch, kv_heads, context, head_dim), dtype),
            sd((batch, kv_heads, rows, head_dim), dtype), sd((batch, kv_heads, rows, head_dim), dtype))


@pytest.mark.parametrize("slots,head_dim", [(8, 128), (16, 128), (4, 256)])
def test_kernels_lower_for_gpu_and_tpu(slots, head_dim):
    """Triton's lowering rules and MLIR's verifier, and Mosaic's lowering rules, accept the
    forward and both backward kernels at the Qwen3-4B recipe's shape (512 blocks, 32 query
    heads over 8 KV heads, 4096 context keys), in bf16, for gamma 7 (8 rows a block), 16, and 4
    with Gemma4's head dim."""
    args = _row_layout_args(1, 512, slots, 32, 8, head_dim, 4096, jnp.bfloat16)
    q = args[0]
    backward_args = (*args, q, jax.ShapeDtypeStruct(q.shape[:3], jnp.float32), q)  # out, lse, d_out
    static = dict(slots=slots, blocks=pick_blocks(slots=slots, head_dim=head_dim), scale=head_dim**-0.5)
    assert "triton" in lower(lambda *a: gpu.forward(*a, **static), *args, platform="cuda")
    assert "triton" in lower(lambda *a: gpu.backward(*a, **static), *backward_args, platform="cuda")
    static = dict(slots=slots, scale=head_dim**-0.5)
    assert "tpu_custom_call" in lower(lambda *a: tpu.forward(*a, **static), *args, platform="tpu")
    assert "tpu_custom_call" in lower(lambda *a: tpu.backward(*a, **static), *backward_args, platform="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU")
@pytest.mark.parametrize("head_dim", [64, 128])  # 128: the swept 128 x 128 blocks
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_compiled_kernels_equal_reference_on_gpu(case, dtype, head_dim):
    """The compiled kernels at test sizes with heads of 64 and 128 (Triton's dot needs 16 columns)."""
    args = random_blocks(3, **{**CASES[case], "head_dim": head_dim, "context": 300}, dtype=dtype)
    tolerance = dict(atol=2e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
    out = block_attention(*args, implementation="pallas")
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(reference.block_attention(*args), np.float32), **tolerance)
    for got, want in zip(gradients(args, "pallas"), gradients(args, "xla")):
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(got, np.float32) / scale, np.asarray(want, np.float32) / scale,
                                   **tolerance)
