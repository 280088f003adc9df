"""Speculative decoding is lossless: exact at temperature 0, in distribution otherwise."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax import Draft, Target, generate
from dspark_jax.sampling import SamplingParams, probabilities
from dspark_jax.decoding.batching import pad_prompts
from dspark_jax.decoding.generate import request_keys
from dspark_jax.decoding.scheduler import AsyncPrefixScheduler, FixedScheduler, PrefixScheduler
from dspark_jax.decoding.speculative import extend_context, flush_pending, prefill, spec_round, use_kernels
from dspark_jax.models.config import ModelConfig, RopeConfig
from dspark_jax.models.draft_config import draft_config_for_target
from dspark_jax.models.kv_cache import KVCache, PagedKVCache

V = 8  # a small vocabulary: random drafts overlap the target enough to accept often
TINY = ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=8, eos_token_ids=(7,), max_position_embeddings=256)
# A scheduler that verifies 0 to gamma tokens depending on confidence (steeply falling SPS).
SCHEDULER = PrefixScheduler(sps=tuple(0.8 ** i for i in range(64)))
# One that also knows the draft's cost and drafts only when it pays: on PROMPTS (8 rows) about
# two fifths of the rounds are not drafted, and about two fifths of the sampled test's 8192
# rows' rounds (its rounds after the first draft only when the last round's expected
# survivals sum to more than 2 per row).
GATED = PrefixScheduler(sps=tuple(0.98 ** i for i in range(64)),
                        draft_seconds=tuple(0.1 * (1 + 0.1 * r) for r in range(8)) + (2 / 0.98 ** 63,))
DRAFTERS = [("dspark", None), ("dspark", SCHEDULER), ("dspark", AsyncPrefixScheduler(SCHEDULER.sps)),
            ("dspark", GATED), ("dflash", None), ("dflash", FixedScheduler(2)), ("eagle3", None)]


def scaled(params, factor):
    """Random N(0, 0.02) weights scaled up, so that models have peaked, varied distributions."""
    return jax.tree.map(lambda x: x * factor if x.ndim > 1 else x, params)


@functools.lru_cache(maxsize=None)
def tiny_target():
    t = Target.random(TINY, seed=1, dtype="float32")
    return Target(TINY, scaled(t.params, 20), None, jnp.float32)


@functools.lru_cache(maxsize=None)
def tiny_draft(algorithm):
    target = tiny_target()
    ids = (0, 1, 2, 3) if algorithm == "eagle3" else (-1, 1, 3)
    config = draft_config_for_target(TINY, algorithm, ids, block_size=4, mask_token_id=6, markov_rank=4)
    d = Draft.random(config, target=target, seed=2, dtype="float32")
    own = {k: v for k, v in d.params.items() if k not in ("embed_tokens", "lm_head")}
    return Draft(config, {**scaled(own, 10), "embed_tokens": d.params["embed_tokens"], "lm_head": d.params["lm_head"]},
                 jnp.float32)


PROMPTS = [[1, 2, 3], [4, 5, 6, 1, 2, 0, 3], [3], [5, 5], [7, 1], [2, 2, 2], [0, 1, 0], [6, 6, 6, 6]]


# kernels="pallas": speculative decoding attends over paged caches with the Pallas kernel
# (interpreted on CPU), against autoregressive decoding in XLA. In the slow set: DSpark with the
# prefix and the asynchronous schedulers (in XLA, and the prefix one with the kernel), whose
# rounds (spec_round) the engine's greedy test runs in CI; here CI keeps generate's loop with
# the other drafters and with GATED (whose drafted rounds are the prefix scheduler's).
GREEDY = [pytest.param(d, s, "xla", marks=pytest.mark.slow if s is SCHEDULER or isinstance(s, AsyncPrefixScheduler)
                       else ()) for d, s in DRAFTERS] + [
    pytest.param("dspark", SCHEDULER, "pallas", id="dspark-scheduler-pallas", marks=pytest.mark.slow),
    pytest.param("dflash", None, "pallas", id="dflash-pallas")]


@pytest.mark.parametrize("algorithm,scheduler,kernels", GREEDY)
def test_greedy_equals_autoregressive(algorithm, scheduler, kernels):
    target, draft = tiny_target(), tiny_draft(algorithm)
    ar = generate(target, None, PROMPTS, max_new_tokens=20, temperature=0.0)
    spec = generate(target, draft, PROMPTS, max_new_tokens=20, temperature=0.0, scheduler=scheduler,
                    kernels=kernels)
    assert spec.tokens == ar.tokens
    assert any(t[-1] == 7 for t in ar.tokens) and any(len(t) == 20 for t in ar.tokens)  # both endings occur
    for tokens, verified, accepted in zip(spec.tokens, spec.verify_lengths, spec.accepted_lengths):
        assert len(verified) == len(accepted) >= 1
        assert all(0 <= a <= v <= 4 for v, a in zip(verified, accepted))
        if isinstance(scheduler, FixedScheduler):
            assert set(verified) == {2}  # every round, the last one too
        assert sum(accepted) + len(accepted) >= len(tokens) - 1  # a round commits at most accepted + 1


# Gemma4: sliding-window layers (window 4, so generations leave it behind; generate keeps them in
# rings of window + the longest extension) between full layers whose one key/value head doubles
# as values, proportional RoPE, soft-capped logits, scaled embeddings, sandwich norms.
GEMMA = ModelConfig(family="gemma4", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=8, eos_token_ids=(7,), max_position_embeddings=256,
                    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0,
                    layer_types=("sliding_attention", "full_attention") * 2, sliding_window=4, global_head_dim=16,
                    num_global_kv_heads=1, attention_k_eq_v=True,
                    global_rope=RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25))


def norms_varied(params, seed):
    """Norm scales (and layer scalars) drawn from U(0.2, 3): with Gemma4's sandwich norms, that
    and not the matrices' scale is what keeps greedy generations from repeating one token."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([x * jax.random.uniform(k, x.shape, minval=0.2, maxval=3.0) if x.ndim == 1 else x
                           for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def gemma_target():
    t = Target.random(GEMMA, seed=3, dtype="float32")
    return Target(GEMMA, norms_varied(scaled(t.params, 5), 3), None, jnp.float32)


@functools.lru_cache(maxsize=None)
def gemma_draft(algorithm):
    ids = (0, 1, 2, 3) if algorithm == "eagle3" else (-1, 1, 3)
    config = draft_config_for_target(GEMMA, algorithm, ids, block_size=4, mask_token_id=6, markov_rank=4)
    assert config.layers.layer_types == ("full_attention",) * config.layers.num_layers
    d = Draft.random(config, target=gemma_target(), seed=2, dtype="float32")
    own = {k: v for k, v in d.params.items() if k not in ("embed_tokens", "lm_head")}
    return Draft(config, {**scaled(own, 10), "embed_tokens": d.params["embed_tokens"], "lm_head": d.params["lm_head"]},
                 jnp.float32)


# CI: Eagle3 here; DSpark on Gemma4 through the engine (tests/serving/test_engine.py); the three drafters'
# Gemma4 modules against the reference's in tests/models/test_gemma4_drafts.py
@pytest.mark.parametrize("algorithm", [pytest.param(a, marks=pytest.mark.slow) for a in ("dspark", "dflash")]
                         + ["eagle3"])
def test_gemma4_greedy_equals_autoregressive(algorithm):
    target, draft = gemma_target(), gemma_draft(algorithm)
    ar = generate(target, None, PROMPTS, max_new_tokens=20, temperature=0.0)
    spec = generate(target, draft, PROMPTS, max_new_tokens=20, temperature=0.0)
    assert spec.tokens == ar.tokens
    assert max(map(len, ar.tokens)) > 2 * GEMMA.sliding_window and len(set(sum(ar.tokens, []))) >= 5
    assert sum(map(sum, spec.accepted_lengths)) > 0  # drafts were accepted, so verify extensions were rolled back


def test_the_kernel_setting_picks_the_caches():
    """With kernels="pallas" prefill keeps the target's and the draft's caches in pages (the
    kernel reads paged caches only) with room for the whole generation, holding what the
    contiguous caches of "xla" hold."""
    tokens, lengths = pad_prompts(PROMPTS)
    b = tokens.shape[0]
    sampling = SamplingParams.rows(len(PROMPTS), temperature=0.0, pad_to=b)
    caches = {}
    for kernels in ("xla", "pallas"):
        target, draft = use_kernels(tiny_target(), tiny_draft("eagle3"), kernels)
        assert target.config.attention == draft.config.layers.attention == kernels
        state, _ = prefill(target.model, draft.model, None, target.params, draft.params, jnp.asarray(tokens),
                           jnp.asarray(lengths), sampling, request_keys(0, len(PROMPTS), b), jnp.full((b,), 8),
                           jnp.full((b, 1), 7), cache_length=48)
        caches[kernels] = (state.target_cache, state.draft_cache)
    for contiguous, paged in zip(caches["xla"], caches["pallas"]):
        assert isinstance(contiguous, KVCache) and isinstance(paged, PagedKVCache) and paged.max_length >= 48
        np.testing.assert_array_equal(paged.lengths, contiguous.lengths)
    np.testing.assert_array_equal(caches["pallas"][0].lengths, lengths)  # the prompts are in the target's cache


def test_greedy_drafts_are_accepted_somewhere():
    """The equality above is not vacuous: some rounds accept draft tokens."""
    spec = generate(tiny_target(), tiny_draft("dspark"), PROMPTS, max_new_tokens=20, temperature=0.0)
    assert sum(map(sum, spec.accepted_lengths)) > 0


def undrafted_rounds(result) -> int:
    """Rounds that did not draft: their confidences come back as zeros."""
    return sum(int(np.sum(np.all(np.asarray(c) == 0, axis=1))) for c in result.confidence_logits)


def test_gated_rounds_mix_drafted_and_autoregressive():
    """The greedy equality above with GATED is not vacuous: both kinds of round occur. And a
    batch that stopped drafting tries again later although its rows stay the same (their last
    confidences drift up while they do not draft)."""
    spec = generate(tiny_target(), tiny_draft("dspark"), PROMPTS, max_new_tokens=20, temperature=0.0, scheduler=GATED)
    rounds = sum(map(len, spec.confidence_logits))
    assert 0.2 * rounds < undrafted_rounds(spec) < 0.8 * rounds
    long = generate(tiny_target(), tiny_draft("dspark"), PROMPTS, max_new_tokens=40, temperature=0.0, scheduler=GATED,
                    stop_ids=())
    together = min(map(len, long.confidence_logits))  # rounds in which every row took part
    kinds = "".join("." if np.all(c == 0) else "D" for c in long.confidence_logits[0][:together])
    assert "..D" in kinds, kinds


def test_undrafted_rounds_sample_exactly_like_autoregressive_decoding():
    """When drafting never pays, every round is the autoregressive step with the same random
    stream: sampled tokens equal the target's own, seed for seed."""
    never = PrefixScheduler(SCHEDULER.sps, draft_seconds=(1e9,))
    target, draft = tiny_target(), tiny_draft("dspark")
    ar = generate(target, None, PROMPTS, max_new_tokens=12, temperature=1.0, seed=[3, 1, 4, 1, 5, 9, 2, 6])
    gated = generate(target, draft, PROMPTS, max_new_tokens=12, temperature=1.0, seed=[3, 1, 4, 1, 5, 9, 2, 6],
                     scheduler=never)
    assert gated.tokens == ar.tokens and undrafted_rounds(gated) == sum(map(len, gated.confidence_logits))


def test_a_round_forecasts_its_accepted_tokens_from_its_confidences():
    """A drafted round's `forecast` is, per row, the prefix survivals of the slots it verified,
    up to an accepted stop token (tokens 3 and 5 stop half the rows), with the scheduler's
    temperatures (float64 here, from the round's own confidences, verify lengths and counts);
    a row that did not take part forecasts nothing."""
    target, draft = tiny_target(), tiny_draft("dspark")
    temperatures = (0.7, 1.3, 2.0, 0.9)
    scheduler = PrefixScheduler(sps=tuple(0.98 ** i for i in range(64)), temperatures=temperatures)
    models = (target.model, draft.model)
    b = len(PROMPTS)
    tokens, lengths = pad_prompts(PROMPTS)
    lengths[2] = 0  # a padding row
    sampling = SamplingParams.rows(b, temperature=1.0)
    keys, max_new = request_keys(5, b, b), jnp.full((b,), 64, jnp.int32)
    stops = jnp.asarray([[3, 5] if i % 2 else [-1, -1] for i in range(b)], jnp.int32)
    state, _ = prefill(*models, scheduler, target.params, draft.params, jnp.asarray(tokens), jnp.asarray(lengths),
                       sampling, keys, max_new, stops, cache_length=128)
    forecasts, stopped = [], 0
    for _ in range(6):
        state, out = spec_round(*models, scheduler, target.params, draft.params, state)
        conf = np.asarray(out.confidence, np.float64)
        survival = np.cumprod(1 / (1 + np.exp(-conf / np.asarray(temperatures))), axis=1)
        length, accepted, count = (np.asarray(x) for x in (out.verify_length, out.accepted, out.count))
        ends = [min(n, a) if c == a else n for n, a, c in zip(length, accepted, count)]  # a stop: no bonus token
        stopped += sum(bool(out.drafted[i]) and count[i] == accepted[i] for i in range(b))
        want = [survival[i, :ends[i]].sum() if out.drafted[i] else 0.0 for i in range(b)]
        np.testing.assert_allclose(np.asarray(out.forecast), want, rtol=1e-5, atol=1e-6)
        assert not out.drafted[2] and out.forecast[2] == 0
        forecasts += want
    assert 0 < min(f for f in forecasts if f) and len(set(np.round(forecasts, 3))) > 8  # varied rounds
    assert stopped > 0


# CI: the engine's undrafted rounds (tests/serving/test_engine.py) and the gated rounds here
@pytest.mark.slow
@pytest.mark.parametrize("flush_first", [False, True], ids=["each-round", "flushed-before"])
def test_undrafted_rounds_keep_the_draft_context_complete(flush_first):
    """Rounds without drafting feed the draft every committed position (the first one takes in
    all the positions the last drafted round verified), or leave them pending for the caller,
    who flushes them before a run of at most G + 1 such rounds (`catch_up=False`, as the
    engine runs them): afterwards the draft proposes what a draft prefilled on the whole
    committed context proposes."""
    target, draft = tiny_target(), tiny_draft("dspark")
    never = PrefixScheduler(SCHEDULER.sps, draft_seconds=(1e9,))
    models = (target.model, draft.model)
    b = len(PROMPTS)
    tokens, lengths = pad_prompts(PROMPTS)
    sampling = SamplingParams.rows(b, temperature=0.0)
    keys, max_new, stops = request_keys(0, b, b), jnp.full((b,), 64, jnp.int32), jnp.full((b, 1), -1, jnp.int32)
    state, first = prefill(*models, never, target.params, draft.params, jnp.asarray(tokens), jnp.asarray(lengths),
                           sampling, keys, max_new, stops, cache_length=128)
    committed = [p + [int(t)] for p, t in zip(PROMPTS, first)]

    def run_round(state, scheduler, committed, catch_up=True):
        state, out = spec_round(*models, scheduler, target.params, draft.params, state,
                                drafting=None if catch_up else False, catch_up=catch_up)
        assert bool(jnp.all(out.drafted)) == (scheduler is None)
        for row, (t, n) in enumerate(zip(np.asarray(out.tokens), np.asarray(out.count))):
            committed[row] += t[:n].tolist()
        return state

    drafted = 0
    while drafted < 3 or np.asarray(state.pending_count).max() < 2:  # drafted rounds until one accepts
        assert drafted < 12, "no drafted round accepted a token"
        drafted += 1
        state = run_round(state, None, committed)
    for i in range(6):  # the first of these takes in several positions at once
        if flush_first and i % 4 == 0:  # runs of 4 and 2 rounds
            state = flush_pending(draft.model, draft.params, state, ~state.done)
        state = run_round(state, never, committed, catch_up=not flush_first)
    if flush_first:
        assert np.asarray(state.pending_count).tolist() == [2] * b  # the last run's anchors wait
    context = [c[:-1] for c in committed]
    width = max(map(len, context))
    ids = np.asarray([c + [0] * (width - len(c)) for c in context], np.int32)
    next_ids = np.asarray([c[1:] + [0] * (width + 1 - len(c)) for c in context], np.int32)
    fresh, _ = extend_context(*models, None, target.params, draft.params, target.model.init_cache(b, 128),
                              draft.model.init_cache(b, 128), jnp.asarray(ids), jnp.asarray(next_ids),
                              jnp.asarray([len(c) for c in context]), jnp.ones((b,), bool),
                              jnp.asarray([c[-1] for c in committed]), jnp.zeros((b,), jnp.int32), max_new, sampling,
                              keys, stops)
    propose = jax.jit(draft.model.propose)  # one program for both states (eagerly, each operation compiles)
    proposals = [propose(draft.params, s.draft_cache, s.pending_features, s.pending_next, s.pending_count, s.anchor,
                         keys, sampling)[0] for s in (state, fresh)]
    np.testing.assert_array_equal(proposals[0].tokens, proposals[1].tokens)
    np.testing.assert_allclose(proposals[0].confidence, proposals[1].confidence, atol=1e-4)
    np.testing.assert_allclose(proposals[0].probs, proposals[1].probs, atol=1e-5)


def exact_joint(target, prompt, n_tokens, sampling):
    """P(x_1..x_n | prompt) for every sequence of n tokens, by enumeration: [V] * n."""
    forward = jax.jit(target.forward)
    probs = np.zeros((V,) * n_tokens)
    for seq in itertools.product(range(V), repeat=n_tokens - 1):
        ids = np.asarray([prompt + list(seq)], np.int32)
        logits, _, _ = forward(target.params, ids)
        p = np.asarray(probabilities(logits[0], sampling), np.float64)  # [T, V]
        prob = np.prod([p[len(prompt) - 1 + i, t] for i, t in enumerate(seq)])
        probs[seq] = prob * p[-1]
    return probs


@functools.lru_cache(maxsize=None)
def joint(temperature, top_p):
    return exact_joint(tiny_target(), [1, 2, 3], 3, SamplingParams(temperature, 0, top_p))


N_SAMPLES = 8192


def chi_square(counts, expected):
    """Pearson chi-square with cells of expected count < 5 pooled; returns (p-value, dof)."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert counts[expected == 0].sum() == 0, "a sequence of probability 0 was generated"
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum())[1], keep.sum() - 1


def test_statistical_power():
    """Power of the test below: at alpha = 1e-3 with N = 8192 draws, a sampler whose output
    distribution is off by a chi-square distance sum((p' - p)^2 / p) of 0.02 (e.g. every
    probability 15% too high or too low on alternating cells) is caught with probability > 0.99."""
    expected = joint(1.0, 1.0).reshape(-1) * N_SAMPLES
    dof = int((expected >= 5).sum())
    critical = stats.chi2.ppf(1 - 1e-3, dof)
    power = 1 - stats.ncx2.cdf(critical, dof, N_SAMPLES * 0.02)
    assert power > 0.99, power


# Every drafter at T=1 in CI; the schedulers, and T=0.6 with top-p 0.9, in the slow set (CI
# runs the prefix scheduler at T=1.0, 0.6 and top-p 0.8 in the engine's test_lossless and
# inside GATED's drafted rounds here; tests/decoding/test_per_row.py mixes T=0.6 and top-p
# rows).
SAMPLED = [pytest.param(d, s, 1.0, 1.0, marks=pytest.mark.slow if s is not None else ()) for d, s in DRAFTERS] + [
    pytest.param(d, s, 0.6, 0.9, marks=pytest.mark.slow) for d, s in DRAFTERS]


@pytest.mark.parametrize("algorithm,scheduler,temperature,top_p", SAMPLED)
def test_sampled_output_matches_target_distribution(algorithm, scheduler, temperature, top_p):
    """The first three generated tokens of 8192 independent samples of one prompt follow the
    target's exact joint distribution (chi-square, alpha = 1e-3)."""
    result = generate(tiny_target(), tiny_draft(algorithm), [[1, 2, 3]] * N_SAMPLES, max_new_tokens=3,
                      temperature=temperature, top_p=top_p, seed=5, scheduler=scheduler, stop_ids=())
    outs = np.asarray(result.tokens)
    counts = np.bincount(outs[:, 0] * V * V + outs[:, 1] * V + outs[:, 2], minlength=V**3)
    p_value, _ = chi_square(counts, joint(temperature, top_p).reshape(-1) * N_SAMPLES)
    assert p_value > 1e-3, p_value
    assert sum(map(sum, result.accepted_lengths)) > 0.2 * N_SAMPLES  # the drafts did get accepted
    if scheduler is GATED:  # and rounds without a draft occurred among them
        assert 0.2 < undrafted_rounds(result) / sum(map(len, result.confidence_logits)) < 0.8


def test_seeds_and_independent_rows():
    target, draft = tiny_target(), tiny_draft("dspark")
    a = generate(target, draft, PROMPTS, max_new_tokens=10, seed=3, stop_ids=())
    b = generate(target, draft, PROMPTS, max_new_tokens=10, seed=3, stop_ids=())
    c = generate(target, draft, PROMPTS, max_new_tokens=10, seed=4, stop_ids=())
    assert a.tokens == b.tokens and a.tokens != c.tokens
    same = generate(target, draft, [[1, 2]] * 8, max_new_tokens=10, seed=3, stop_ids=())
    assert len({tuple(t) for t in same.tokens}) > 1


def test_bad_input():
    target, draft = tiny_target(), tiny_draft("dspark")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(target, draft, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(target, draft, [[1] * 250], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(target, draft, [[1]], max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be"):
        generate(target, draft, [[1]], max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="a scheduler needs a draft with a confidence head"):
        generate(target, tiny_draft("dflash"), [[1]], max_new_tokens=4, scheduler=SCHEDULER)
    other = ModelConfig(family="qwen3", vocab_size=12, hidden_size=32, intermediate_size=48, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=8)
    bad_vocab = Draft.random(draft_config_for_target(other, "dflash", (0, 1), block_size=4, mask_token_id=11),
                             dtype="float32")
    with pytest.raises(ValueError, match="vocab_size 12 != target's 8"):
        generate(target, bad_vocab, [[1]], max_new_tokens=4)
    deeper = dataclasses.replace(TINY, num_layers=8)
    bad_layers = Draft.random(draft_config_for_target(deeper, "dflash", (0, 6), block_size=4, mask_token_id=6),
                              dtype="float32")
    with pytest.raises(ValueError, match=r"tapped layers \[0, 6\] of a 8-layer target"):
        generate(target, bad_layers, [[1]], max_new_tokens=4)


@pytest.mark.parametrize("algorithm", ["dspark", pytest.param("dflash", marks=pytest.mark.slow)])
def test_sampled_tokens_are_the_same_with_the_kernels(algorithm):
    """kernels="pallas" (paged attention and fused rejection sampling, interpreted here) draws
    from the same keys what the XLA path draws: the same tokens, at T = 1.0 and 0.6 in one
    batch, so the XLA path's chi-square tests carry over."""
    target, draft = tiny_target(), tiny_draft(algorithm)
    temperature = [1.0, 0.6] * (len(PROMPTS) // 2)
    runs = [generate(target, draft, PROMPTS, max_new_tokens=12, temperature=temperature, seed=3, kernels=kernels)
            for kernels in ("xla", "pallas")]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].accepted_lengths == runs[1].accepted_lengths
    assert sum(map(sum, runs[1].accepted_lengths)) > 0
