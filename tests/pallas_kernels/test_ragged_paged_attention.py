"""Ragged paged attention: the jnp reference against a float64 numpy loop, and the Pallas kernels
(the GPU kernel interpreted on CPU and compiled with `-m gpu` on a GPU, the TPU kernel on the
TPU interpreter) against the reference, on random ragged
batches: empty rows, decode rows (one query), verify blocks (1 + gamma queries), prefill chunks
spanning several query blocks, blocks that cross a page boundary, GQA groups of 1, 3, 4 and 8,
one or several pages per inner step (also more than the block table holds), rows split
between programs, and sliding windows with another score scale (Gemma4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu
from pallas_kernels.ragged_paged_attention import gpu, ragged_paged_attention, reference, tpu, unsupported
from pallas_kernels.ragged_paged_attention.tuning import pick_blocks, tpu_pages
from pallas_kernels.lowering import lower

on_gpu = jax.default_backend() == "gpu"
TPU_INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise")


def ragged_batch(seed, *, queries, kv_heads, group, head_dim, page_size, columns, num_new, dtype=jnp.float32):
    """Rows of len(num_new) requests: row b has written num_new[b] new tokens (its queries) after
    a random context, so its length is context + num_new[b] <= columns * page_size; queries past
    num_new[b] are padding (they see the whole row). Pages are shuffled across rows of one
    shared pool; the first row with no new tokens is empty (length 0)."""
    rng = np.random.default_rng(seed)
    b = len(num_new)
    num_new = np.asarray(num_new)
    capacity = columns * page_size
    lengths = rng.integers(num_new, capacity + 1)
    lengths[np.flatnonzero(num_new == 0)[:1]] = 0
    pool = b * columns + 3
    table = rng.permutation(pool)[: b * columns].reshape(b, columns).astype(np.int32)
    positions = (lengths - num_new)[:, None] + np.arange(queries)[None]
    n = kv_heads * group
    q = rng.standard_normal((b, queries, n, head_dim))
    k = rng.standard_normal((pool, page_size, kv_heads, head_dim))
    v = rng.standard_normal((pool, page_size, kv_heads, head_dim))
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return (*arrays, jnp.asarray(table), jnp.asarray(positions, jnp.int32), jnp.asarray(lengths, jnp.int32)), num_new


def numpy_attention(q, k_pages, v_pages, table, positions, lengths, scale=None, window=None):
    """float64 loops: each query over the positions it may see, read page by page. Returns the
    outputs [B, T, N, D] and the log-sum-exp of the scaled scores [B, T, N]."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    b, t, n, d = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    out, lse = np.zeros_like(q), np.full((b, t, n), -np.inf)
    for i in range(b):
        for j in range(t):
            seen = [s for s in range(int(lengths[i]))
                    if s <= positions[i, j] and (window is None or positions[i, j] - s < window)]
            if not seen:
                continue
            pages = [int(table[i, s // page_size]) for s in seen]
            keys = np.stack([k_pages[p, s % page_size] for p, s in zip(pages, seen)])  # [S, K, D]
            values = np.stack([v_pages[p, s % page_size] for p, s in zip(pages, seen)])
            for h in range(n):
                g = h // (n // kv_heads)
                scores = keys[:, g] @ q[i, j, h] * (1 / np.sqrt(d) if scale is None else scale)
                weights = np.exp(scores - scores.max())
                out[i, j, h] = weights @ values[:, g] / weights.sum()
                lse[i, j, h] = scores.max() + np.log(weights.sum())
    return out, lse


CASES = {  # id: ragged_batch arguments
    "decode-gqa4": dict(queries=1, kv_heads=2, group=4, head_dim=16, page_size=4, columns=8,
                        num_new=[1, 1, 0, 1, 1]),
    "verify-gqa3": dict(queries=5, kv_heads=3, group=3, head_dim=16, page_size=4, columns=8,
                        num_new=[5, 1, 0, 3, 5, 2]),
    "verify-mha": dict(queries=8, kv_heads=4, group=1, head_dim=32, page_size=8, columns=4,
                       num_new=[8, 1, 8, 0, 4]),
    "verify-gqa8": dict(queries=4, kv_heads=1, group=8, head_dim=16, page_size=4, columns=16,
                        num_new=[4, 2, 0, 1, 4]),
    "odd-table": dict(queries=3, kv_heads=2, group=4, head_dim=16, page_size=4, columns=5,
                      num_new=[3, 0, 1, 2]),
    "prefill-chunks": dict(queries=40, kv_heads=2, group=2, head_dim=16, page_size=8, columns=8,
                           num_new=[40, 13, 0, 27]),
    # Gemma4's sliding-window layers: windows shorter than a page step and than a chunk
    "sliding-verify": dict(queries=5, kv_heads=2, group=2, head_dim=16, page_size=4, columns=8,
                           num_new=[5, 1, 0, 3], scale=1.0, window=6),
    "sliding-prefill": dict(queries=40, kv_heads=1, group=4, head_dim=32, page_size=8, columns=8,
                            num_new=[40, 13, 0, 27], scale=0.5, window=11),
}


def case_args(case, seed):
    """(ragged_batch's arrays, the attention options scale and window) of a case."""
    spec = dict(CASES[case])
    options = {key: spec.pop(key) for key in ("scale", "window") if key in spec}
    return ragged_batch(seed, **spec)[0], options


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_a_float64_loop(case):
    args, options = case_args(case, 0)
    got, lse = map(np.asarray, reference.ragged_paged_attention(*args, return_lse=True, **options))
    want, want_lse = numpy_attention(*args, **options)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)  # -inf where a query sees nothing
    lengths = np.asarray(args[-1])
    assert (lengths == 0).any() and np.all(got[lengths == 0] == 0)  # an empty row sees nothing: zeros


BLOCKS = {  # id: Blocks for the kernel, or None for tuning.pick_blocks
    "tuned": None,
    "page-steps": gpu.Blocks(block_q=16, pages=1, splits=1),
    "split": gpu.Blocks(block_q=16, pages=2, splits=3),
}


@pytest.mark.parametrize("blocks", [pytest.param(b, marks=pytest.mark.slow) if b == "page-steps" else b
                                    for b in BLOCKS])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference(case, blocks):
    args, options = case_args(case, 1)
    got, lse = map(np.asarray, ragged_paged_attention(*args, blocks=BLOCKS[blocks], return_lse=True, **options))
    want, want_lse = map(np.asarray, reference.ragged_paged_attention(*args, return_lse=True, **options))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("pages", [pytest.param(1, marks=pytest.mark.slow), 2])
@pytest.mark.parametrize("case", CASES)
def test_tpu_kernel_equals_reference(case, pages):
    """The Mosaic kernel on the TPU interpreter, which raises on any read out of bounds: one or
    two table columns per step (tables of 5 columns: a last step that overhangs)."""
    args, options = case_args(case, 1)
    got, lse = map(np.asarray, tpu.ragged_paged_attention(*args, pages=pages, interpret=TPU_INTERPRET,
                                                          return_lse=True, **options))
    want, want_lse = map(np.asarray, reference.ragged_paged_attention(*args, return_lse=True, **options))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)


def test_several_query_blocks_skip_keys_past_their_last_position():
    """A 40-token chunk of group 2 spans query blocks of 16 rows; each block stops at its own
    last position, and the rows still equal the reference."""
    case = CASES["prefill-chunks"]
    args, _ = ragged_batch(2, **case)
    blocks = gpu.Blocks(block_q=16, pages=1, splits=1)
    np.testing.assert_allclose(np.asarray(ragged_paged_attention(*args, blocks=blocks)),
                               np.asarray(reference.ragged_paged_attention(*args)), atol=2e-5, rtol=1e-5)


def test_tuning_fills_the_chip_with_splits_only_when_rows_are_few():
    few = pick_blocks(batch=1, kv_heads=8, query_rows=4, head_dim=128, page_size=32, table_columns=256)
    many = pick_blocks(batch=64, kv_heads=8, query_rows=4, head_dim=128, page_size=32, table_columns=16)
    assert few.splits > 1 and many.splits == 1
    assert (few.block_q, few.pages, many.pages) == (16, 2, 4)  # split rows 64 keys a step, the others 128
    assert pick_blocks(batch=64, kv_heads=8, query_rows=4, head_dim=128, page_size=32, table_columns=16,
                       itemsize=4).pages == 2  # longer steps were measured in bf16 only
    odd = pick_blocks(batch=4, kv_heads=2, query_rows=32, head_dim=64, page_size=16, table_columns=6)
    assert odd.pages == 8  # 128 keys; the kernel pads the table to whole steps
    assert pick_blocks(batch=4, kv_heads=2, query_rows=1, head_dim=64, page_size=4, table_columns=2).pages == 4
    wide = dict(batch=1, kv_heads=1, query_rows=128, head_dim=512, page_size=16, table_columns=32)
    assert pick_blocks(**wide).block_q == 64 and pick_blocks(**wide, itemsize=4).block_q == 32  # shared memory


def test_shapes_the_compiled_kernel_cannot_take_are_named():
    assert unsupported(128, 32) is None and unsupported(64, 16) is None
    assert "head_dim=96" in unsupported(96, 16) and "head_dim=8" in unsupported(8, 16)
    assert "page_size=24" in unsupported(128, 24)
    assert "too large" in unsupported(128, 256) and unsupported(128, 128) is None
    assert "too large" in unsupported(512, 32, itemsize=4) and unsupported(512, 16, itemsize=4) is None


def test_lengths_past_the_block_table_are_cut_at_its_capacity():
    """A length beyond what the table holds reads no padding column (a step of 4 pages over a
    3-page table, or of 2 pages on the TPU kernel), as the reference, which sees only the
    table's positions."""
    args, _ = ragged_batch(4, queries=2, kv_heads=1, group=2, head_dim=16, page_size=4, columns=3, num_new=[2, 1])
    q, k, v, table, _, _ = args
    lengths = jnp.asarray([20, 30], jnp.int32)
    positions = lengths[:, None] - 2 + jnp.arange(2)[None]
    got = ragged_paged_attention(q, k, v, table, positions, lengths, blocks=gpu.Blocks(16, 4, 2))
    want = reference.ragged_paged_attention(q, k, v, table, positions, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    on_tpu = tpu.ragged_paged_attention(q, k, v, table, positions, lengths, pages=2, interpret=TPU_INTERPRET)
    np.testing.assert_allclose(np.asarray(on_tpu), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_unknown_implementation_is_refused():
    args, _ = ragged_batch(0, **CASES["decode-gqa4"])
    with pytest.raises(ValueError, match="implementation 'triton' is not one of"):
        ragged_paged_attention(*args, implementation="triton")


GPU_SHAPES = [
    dict(queries=1, kv_heads=8, group=4, head_dim=128, page_size=32, columns=16, num_new=[1] * 63 + [0]),
    dict(queries=8, kv_heads=3, group=3, head_dim=64, page_size=32, columns=8, num_new=[8, 1, 0, 5] * 4),
    dict(queries=8, kv_heads=8, group=4, head_dim=128, page_size=16, columns=64, num_new=[8]),
    dict(queries=128, kv_heads=8, group=4, head_dim=128, page_size=32, columns=8, num_new=[128, 77, 0, 1]),
    # the engine's whole-context tables (not a power of two wide), SmolLM2's heads on 16-position pages
    dict(queries=8, kv_heads=3, group=3, head_dim=64, page_size=16, columns=257, num_new=[8, 3, 0, 1] * 2),
    dict(queries=4, kv_heads=8, group=4, head_dim=128, page_size=32, columns=129, num_new=[4, 4, 0]),
    # Gemma-4-12B's sliding layers (window 1024, scale 1) and its global layers' head dim
    dict(queries=8, kv_heads=8, group=2, head_dim=256, page_size=32, columns=64, num_new=[8, 1, 0, 5],
         scale=1.0, window=1024),
    dict(queries=8, kv_heads=1, group=16, head_dim=512, page_size=16, columns=32, num_new=[8, 1, 0, 5], scale=1.0),
]
GPU_IDS = ["decode-qwen3", "verify-smollm2", "verify-long-split", "prefill", "wide-table-smollm2", "wide-table-split",
           "sliding-gemma4", "global-gemma4"]


def gpu_case(shape, dtype):
    """(arrays, the kernel's keyword options) of one of GPU_SHAPES."""
    shape = dict(shape)
    options = {key: shape.pop(key) for key in ("scale", "window") if key in shape}
    args, _ = ragged_batch(3, dtype=dtype, **shape)
    return args, options


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=GPU_IDS)
def test_kernels_lower_for_gpu_and_tpu(shape):
    """Triton's and Mosaic's lowering rules accept the kernels at each compiled test's shape (in
    bf16) with the block sizes `tuning` gives them."""
    args, options = gpu_case(shape, jnp.bfloat16)
    q, k = args[0], args[1]
    blocks = pick_blocks(batch=q.shape[0], kv_heads=k.shape[2], query_rows=q.shape[1] * (q.shape[2] // k.shape[2]),
                         head_dim=q.shape[3], page_size=k.shape[1], table_columns=args[3].shape[1])
    kernel = functools.partial(gpu.ragged_paged_attention, blocks=blocks, **options)
    assert "ragged_paged_attention" in lower(kernel, *args, platform="cuda")
    kernel = functools.partial(tpu.ragged_paged_attention, pages=tpu_pages(k.shape[1], args[3].shape[1]), **options)
    assert "tpu_custom_call" in lower(kernel, *args, platform="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=GPU_IDS)
def test_compiled_kernel_equals_reference_on_gpu(shape, dtype):
    args, options = gpu_case(shape, dtype)
    got, lse = ragged_paged_attention(*args, return_lse=True, **options)
    want, want_lse = reference.ragged_paged_attention(*args, return_lse=True, **options)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert np.isfinite(got).all() and err < (1e-5 if dtype == jnp.float32 else 1e-2), err
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-2, rtol=1e-3)
