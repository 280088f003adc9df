"""KV-cache paths (prefill, decode, multi-token verify, rollback) reproduce the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import load_target
from tests.helpers import max_rel_err, tiny_path

TOTAL = 14
PROMPT_LENS = [5, 9, 1]
TAPS = (0, 2)


@pytest.fixture(scope="module", params=["qwen3_gqa_untied", "llama_gqa_llama3rope", "gemma4_sliding_k_eq_v"])
def setup(request):
    target = load_target(tiny_path(request.param), dtype="float32")
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, target.config.vocab_size, (len(PROMPT_LENS), TOTAL)).astype(np.int32)
    forward = jax.jit(target.forward, static_argnames="hidden_layers")
    ref = [forward(target.params, s[None], hidden_layers=TAPS) for s in seqs]
    ref_logits = np.stack([np.asarray(r[0][0]) for r in ref])  # [B, TOTAL, V]
    ref_taps = np.stack([np.asarray(r[2][0]) for r in ref])  # [B, TOTAL, n, H]
    extend = jax.jit(target.extend, static_argnames=("hidden_layers", "last_only"))
    return target, seqs, ref_logits, ref_taps, extend


def _step(target, extend, cache, seqs, starts, counts, width):
    """Extends row b by seqs[b, starts[b] : starts[b] + counts[b]] (padded to `width`)."""
    tokens = np.zeros((len(seqs), width), np.int32)
    for b, (s, c) in enumerate(zip(starts, counts)):
        tokens[b, :c] = seqs[b, s : s + c]
    logits, _, taps, cache = extend(target.params, cache, tokens, np.asarray(counts, np.int32), hidden_layers=TAPS)
    return np.asarray(logits), np.asarray(taps), cache


def _check(logits, taps, ref_logits, ref_taps, starts, counts):
    for b, (s, c) in enumerate(zip(starts, counts)):
        if c:
            assert max_rel_err(logits[b, :c], ref_logits[b, s : s + c]) <= 1e-5, (b, s, c)
            assert max_rel_err(taps[b, :c], ref_taps[b, s : s + c]) <= 1e-5, (b, s, c)


def _prefill(target, extend, seqs, ref_logits, ref_taps):
    cache = target.init_cache(len(seqs), 32)
    logits, taps, cache = _step(target, extend, cache, seqs, [0] * len(seqs), PROMPT_LENS, max(PROMPT_LENS))
    _check(logits, taps, ref_logits, ref_taps, [0] * len(seqs), PROMPT_LENS)
    np.testing.assert_array_equal(cache.lengths, PROMPT_LENS)
    return cache


def test_prefill_then_decode_token_by_token(setup):
    target, seqs, ref_logits, ref_taps, extend = setup
    cache = _prefill(target, extend, seqs, ref_logits, ref_taps)
    lengths = list(PROMPT_LENS)
    while min(lengths) < TOTAL:
        counts = [1 if n < TOTAL else 0 for n in lengths]  # finished rows sit still
        logits, taps, cache = _step(target, extend, cache, seqs, lengths, counts, 1)
        _check(logits, taps, ref_logits, ref_taps, lengths, counts)
        lengths = [n + c for n, c in zip(lengths, counts)]
    np.testing.assert_array_equal(cache.lengths, [TOTAL] * len(seqs))


def test_prefill_then_ragged_verify_chunks(setup):
    target, seqs, ref_logits, ref_taps, extend = setup
    cache = _prefill(target, extend, seqs, ref_logits, ref_taps)
    lengths = list(PROMPT_LENS)
    for counts in ([3, 1, 5], [0, 4, 8], [6, 0, 0]):  # 1 + k tokens per row, some rows idle
        logits, taps, cache = _step(target, extend, cache, seqs, lengths, counts, 8)
        _check(logits, taps, ref_logits, ref_taps, lengths, counts)
        lengths = [n + c for n, c in zip(lengths, counts)]
    assert lengths == [TOTAL] * len(seqs)


def test_rollback_then_reextend(setup):
    target, seqs, ref_logits, ref_taps, extend = setup
    cache = _prefill(target, extend, seqs, ref_logits, ref_taps)
    # Extend with wrong tokens (a rejected draft), roll back, then extend with the true ones.
    wrong = (seqs + 1) % target.config.vocab_size
    counts = [4, 3, 7]
    _, _, cache = _step(target, extend, cache, wrong, PROMPT_LENS, counts, 8)
    np.testing.assert_array_equal(cache.lengths, [n + c for n, c in zip(PROMPT_LENS, counts)])
    keep = [1, 0, 2]  # accepted draft tokens per row; the rest is rolled back
    cache = target.rollback(cache, jnp.asarray([n + k for n, k in zip(PROMPT_LENS, keep)]))
    starts = [n + k for n, k in zip(PROMPT_LENS, keep)]
    # The kept wrong tokens stay in the cache, so the reference is the sequence that has them.
    mixed = seqs.copy()
    for b, (n, k) in enumerate(zip(PROMPT_LENS, keep)):
        mixed[b, n : n + k] = wrong[b, n : n + k]
    forward = jax.jit(target.forward, static_argnames="hidden_layers")
    mixed_logits = np.stack([np.asarray(forward(target.params, s[None], hidden_layers=TAPS)[0][0]) for s in mixed])
    mixed_taps = np.stack([np.asarray(forward(target.params, s[None], hidden_layers=TAPS)[2][0]) for s in mixed])
    fill = [TOTAL - s for s in starts]
    logits, taps, cache = _step(target, extend, cache, mixed, starts, fill, 16)
    _check(logits, taps, mixed_logits, mixed_taps, starts, fill)


def test_last_only_logits(setup):
    target, seqs, ref_logits, _, extend = setup
    cache = target.init_cache(len(seqs), 32)
    tokens = np.zeros((len(seqs), 16), np.int32)
    for b, n in enumerate(PROMPT_LENS):
        tokens[b, :n] = seqs[b, :n]
    logits, _, _, _ = extend(target.params, cache, tokens, np.asarray(PROMPT_LENS, np.int32), last_only=True)
    for b, n in enumerate(PROMPT_LENS):
        assert max_rel_err(logits[b], ref_logits[b, n - 1]) <= 1e-5


def test_sliding_window_rings_across_wraps_and_rollbacks():
    """Gemma4 with rings of window + 4 slots in its sliding layers: ragged extensions of up to
    4 tokens, each after a rejected draft at least as long (wrong tokens written, then rolled
    back, leaving stale slots past the row's length), reproduce the full forward far past the
    window and across many wraps of the ring."""
    target = load_target(tiny_path("gemma4_sliding_k_eq_v"), dtype="float32")
    window, total, width = target.config.sliding_window, 40, 4
    rng = np.random.default_rng(1)
    seqs = rng.integers(0, target.config.vocab_size, (3, total)).astype(np.int32)
    forward = jax.jit(target.forward, static_argnames="hidden_layers")
    ref = [forward(target.params, s[None], hidden_layers=TAPS) for s in seqs]
    ref_logits = np.stack([np.asarray(r[0][0]) for r in ref])
    ref_taps = np.stack([np.asarray(r[2][0]) for r in ref])
    extend = jax.jit(target.extend, static_argnames=("hidden_layers", "last_only"))
    cache = target.init_cache(len(seqs), 64, max_extension=width)
    sliding = [i for i, kind in enumerate(target.config.layer_types) if kind == "sliding_attention"]
    assert [cache.k[i].shape[2] for i in range(target.config.num_layers)] == [
        window + width if i in sliding else 64 for i in range(target.config.num_layers)]
    wrong = (seqs + 1) % target.config.vocab_size
    lengths = [0, 0, 0]
    while min(lengths) < total:
        counts = [int(min(rng.integers(0, width + 1), total - n)) for n in lengths]
        drafted = [int(min(rng.integers(c, width + 1), total - n)) for c, n in zip(counts, lengths)]  # >= kept
        _, _, cache = _step(target, extend, cache, wrong, lengths, drafted, width)  # a rejected draft
        cache = target.rollback(cache, jnp.asarray(lengths))
        logits, taps, cache = _step(target, extend, cache, seqs, lengths, counts, width)
        _check(logits, taps, ref_logits, ref_taps, lengths, counts)
        lengths = [n + c for n, c in zip(lengths, counts)]
    with pytest.raises(ValueError, match="at most 4"):
        _step(target, extend, cache, seqs, [0, 0, 0], [0, 0, 0], width + 1)
