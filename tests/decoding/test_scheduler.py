"""Verify-length schedulers against a loop transcription of Algorithm 1, and Appendix A."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.decoding.rejection import verify
from dspark_jax.decoding.scheduler import (AsyncPrefixScheduler, PrefixScheduler, ThresholdScheduler, scheduler_from_spec,
                                           speculation_pays)


def algorithm1(conf, active, sps, early_stop=True):
    """The paper's Algorithm 1 line by line (float64, Python loops)."""
    sig = 1 / (1 + np.exp(-np.asarray(conf, np.float64)))
    r_count, g = sig.shape
    a = np.cumprod(sig, axis=1)
    cands = [(a[r, j], j, r) for r in range(r_count) for j in range(g) if active[r] and a[r, j] > 0]
    cands.sort(key=lambda c: (-c[0], c[1]))
    sps_at = lambda b: sps[min(b, len(sps)) - 1]
    n_active = int(np.sum(active))
    length, best_len = np.zeros(r_count, int), np.zeros(r_count, int)
    batch, tau = n_active, float(n_active)
    best = tau * sps_at(batch) if batch else 0.0
    for a_rj, j, r in cands:
        length[r] = j + 1
        batch += 1
        tau += a_rj
        theta = tau * sps_at(batch)
        if theta > best:
            best, best_len = theta, length.copy()
        elif early_stop:
            break
    return best_len


def random_sps(rng, n):
    """A decreasing steps-per-second curve with occasional cliffs."""
    return tuple(np.cumprod(1 - rng.uniform(0.0, 0.06, n) - (rng.uniform(size=n) < 0.1) * 0.2).tolist())


@pytest.mark.parametrize("early_stop", [True, pytest.param(False, marks=pytest.mark.slow)])  # CI: the default
def test_prefix_scheduler_matches_algorithm1(early_stop):
    """20 random shapes, tables and confidences; jitted, as decoding runs it (one program per
    trial: compiling each operation eagerly for every new shape would cost more)."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        r, g = rng.integers(1, 9), rng.integers(1, 8)
        conf = rng.normal(1.0, 2.0, (r, g)).astype(np.float32)
        active = rng.uniform(size=r) < 0.85
        sps = random_sps(rng, r * (g + 1))
        ours = jax.jit(PrefixScheduler(sps, early_stop=early_stop))(jnp.asarray(conf), jnp.asarray(active))
        np.testing.assert_array_equal(ours, algorithm1(conf, active, sps, early_stop), err_msg=str(trial))


def pays(conf, active, sps, draft_seconds, older=None, scale=1.0, fallback=None):
    """Whether drafting pays, in float64: the round the scheduler would run on these
    confidences priced as it runs, expected tokens over the verify pass (r rows times the
    smallest power of two, capped at G + 1, that holds max(L) + 1) plus the draft's pass,
    against r * SPS(r). Lengths L: Algorithm 1's; with `older` (the asynchronous scheduler's
    confidences two rounds old), the K most surviving candidates, K the global maximum's count
    over `older`. Expected tokens: r + scale x the admitted survivals. A row without history
    (NaN) counts as the mean of the active rows with one, else as `fallback` where it is given
    and not NaN, else as sure."""
    conf = np.asarray(conf, np.float64)
    seen = [i for i in range(len(conf)) if active[i] and not np.isnan(conf[i, 0])]
    sure = np.full(conf.shape[1], 30.0)
    prior = np.mean(conf[seen], axis=0) if seen else sure if fallback is None else np.where(np.isnan(fallback), sure,
                                                                                             fallback)
    conf = np.asarray([prior if np.isnan(c[0]) else c for c in conf])
    r = int(np.sum(active))
    if r == 0:
        return True
    a = np.cumprod(1 / (1 + np.exp(-conf)), axis=1)
    if older is None:
        length = algorithm1(conf, active, sps)
    else:
        budget = int(np.sum(algorithm1(older, active, sps, early_stop=False)))
        cands = sorted((-a[i, j], j, i) for i in range(len(a)) for j in range(a.shape[1]) if active[i] and a[i, j] > 0)
        length = np.zeros(len(a), int)
        for _, j, i in cands[:budget]:
            length[i] = max(length[i], j + 1)
    expected = r + scale * sum(a[i, j] for i in range(len(a)) for j in range(length[i]) if active[i])
    g = conf.shape[1]
    width = min(w for w in [2, 4, 8, 16] + [g + 1] if w >= max(length) + 1 and w <= g + 1)
    sps_at = lambda b: sps[min(max(b, 1), len(sps)) - 1]
    draft = draft_seconds[min(max(r, 1), len(draft_seconds)) - 1]
    return expected / (1 / sps_at(r * width) + draft) > r * sps_at(r)


def test_speculation_pays_matches_a_float64_reference():
    """12 random rounds, half of them with the asynchronous scheduler, 8 with the forecast scaled,
    3 where no active row has drafted (the fallback confidences count); jitted, as decoding runs it."""
    rng = np.random.default_rng(1)
    outcomes = []
    for trial in range(12):
        r, g = rng.integers(1, 9), rng.integers(1, 8)
        conf = rng.normal(0.5, 2.5, (r, g)).astype(np.float32)
        conf[rng.uniform(size=r) < (0.3 if trial % 5 else 1.0)] = np.nan  # rows that have not drafted yet
        active = rng.uniform(size=r) < 0.85
        sps = random_sps(rng, r * (g + 1))
        draft_seconds = tuple(rng.uniform(0.0, 1.5, r).tolist())
        if trial % 2:  # the asynchronous scheduler, its budget from older confidences
            older = rng.normal(0.5, 2.5, (r, g)).astype(np.float32)
            sched, state = AsyncPrefixScheduler(sps, draft_seconds=draft_seconds), (jnp.asarray(older), None)
        else:
            older, sched, state = None, PrefixScheduler(sps, draft_seconds=draft_seconds), None
        scale = 1.0 if trial < 4 else rng.uniform(0.2, 1.5)  # the forecast as the confidences say, then scaled
        # confidences kept from earlier rows, one unknown (their own stream: the rounds stay as they were); none in 0
        fallback = np.random.default_rng(100 + trial).normal(0.5, 2.5, g).astype(np.float32)
        fallback[0] = np.nan
        fallback = None if trial == 0 else fallback
        ours = bool(jax.jit(functools.partial(speculation_pays, sched))(
            jnp.asarray(conf), jnp.asarray(active), state, jnp.float32(scale),
            None if fallback is None else jnp.asarray(fallback)))
        assert ours == pays(conf, active, sps, draft_seconds, older, scale, fallback), trial
        outcomes.append(ours)
    assert 0.1 < np.mean(outcomes) < 0.9  # both answers occur
    # without the draft's cost the scheduler always drafts
    assert bool(speculation_pays(PrefixScheduler(sps), jnp.full((1, 2), -30.0), jnp.asarray([True])))


def test_speculation_pays_prices_the_verify_pass_as_wide_as_it_runs():
    """One row, Algorithm 1 admits 4 sure slots (5 tokens, SPS 1); the round verifies 8 wide,
    past a cliff in the table (SPS 0.3). Priced at 5 tokens, drafting would pay (4.82 tokens in
    1 + 2 s against 1 token/s); at 8 it does not (4.82 in 3.33 + 2 s)."""
    conf = np.asarray([[4.0, 4.0, 4.0, 4.0, -4.0, -4.0, -4.0]], np.float32)
    sps = (1.0,) * 5 + (0.3,) * 11
    sched = PrefixScheduler(sps, draft_seconds=(2.0,))
    np.testing.assert_array_equal(sched(jnp.asarray(conf), jnp.asarray([True])), [4])
    assert not bool(speculation_pays(sched, jnp.asarray(conf), jnp.asarray([True])))
    assert not pays(conf, [True], sps, (2.0,))
    assert bool(speculation_pays(PrefixScheduler(sps, draft_seconds=(0.5,)), jnp.asarray(conf), jnp.asarray([True])))


def test_tables_carry_the_drafts_cost(tmp_path):
    (tmp_path / "plain.json").write_text('{"sps": [3.0, 2.0]}')
    (tmp_path / "costed.json").write_text('{"sps": [3.0, 2.0], "draft_seconds": [0.25, 0.5]}')
    assert scheduler_from_spec(f"prefix:{tmp_path / 'plain.json'}") == PrefixScheduler((3.0, 2.0))
    assert scheduler_from_spec(f"async:{tmp_path / 'costed.json'}") == AsyncPrefixScheduler((3.0, 2.0),
                                                                                         draft_seconds=(0.25, 0.5))


def test_temperatures_and_threshold():
    conf = jnp.asarray([[2.0, 1.0, -0.5, 3.0], [-3.0, 2.0, 2.0, 2.0]])
    active = jnp.asarray([True, True])
    np.testing.assert_array_equal(ThresholdScheduler(0.6)(conf, active), [2, 0])  # sigmoid(1) > .6 > sigmoid(-.5)
    # Dividing the logits by T sharpens or flattens sigmoid(c): T=0.25 pushes sigmoid(1.0) to 0.98.
    temps = (1.0, 0.25, 1.0, 1.0)
    sps = (1.0,) * 10
    plain = np.asarray(jax.nn.sigmoid(conf))
    scaled = plain.copy()
    scaled[:, 1] = np.asarray(jax.nn.sigmoid(conf[:, 1] / 0.25))
    np.testing.assert_array_equal(PrefixScheduler(sps, temps)(conf, active), algorithm1(np.log(scaled / (1 - scaled)), [1, 1], sps))


def test_async_scheduler_budget_from_two_rounds_back():
    sps = (1.0, 0.95, 0.9, 0.85, 0.8, 0.5, 0.45, 0.4, 0.35, 0.3)
    sched = AsyncPrefixScheduler(sps)
    active = jnp.asarray([True, True])
    state = sched.init_state(2, 3)
    confident, doubtful = jnp.full((2, 3), 4.0), jnp.full((2, 3), -4.0)
    # Round 1 and 2 use the all-confident initial history: the budget is the global optimum
    # for near-certain survival, K = 3 here (SPS drops sharply past 5 tokens).
    lengths1, state = sched.step(doubtful, active, state)
    lengths2, state = sched.step(confident, active, state)
    assert int(lengths1.sum()) == 3 and int(lengths2.sum()) == 3
    # Round 3's budget comes from round 1's doubtful confidences: verify nothing.
    lengths3, state = sched.step(confident, active, state)
    assert int(lengths3.sum()) == 0
    # Round 4's comes from round 2's confident ones; the 3 admitted are the most confident now.
    now = jnp.asarray([[5.0, 5.0, -5.0], [4.0, -5.0, -5.0]])
    lengths4, _ = sched.step(now, active, state)
    np.testing.assert_array_equal(lengths4, [2, 1])


def _first_token_distribution(early_stop: bool, n: int, seed: int) -> np.ndarray:
    """The paper's Appendix A, run through our scheduler and rejection sampler.

    One request, gamma = 2, vocabulary {A, B}: target p = (0.7, 0.3), draft q = (0.5, 0.5),
    so slot 1 survives with a_1 = 0.8; the Markov confidence of slot 2 is 0.9 after A and 0
    after B; SPS = (1.0, 0.5, 0.45). Returns the counts of the first committed token.
    """
    p = jnp.asarray([0.7, 0.3])
    q = jnp.asarray([0.5, 0.5])
    sched = PrefixScheduler((1.0, 0.5, 0.45), early_stop=early_stop)
    logit = lambda x: float(np.log(x / (1 - x)))
    keys = jax.random.split(jax.random.key(seed), n)

    def one(key):
        k1, k2, k3 = jax.random.split(key, 3)
        x1 = jax.random.categorical(k1, jnp.log(q))
        x2 = jax.random.categorical(k2, jnp.log(q))
        conf = jnp.stack([jnp.float32(logit(0.8)), jnp.where(x1 == 0, logit(0.9), -30.0)])[None]
        length = sched(conf, jnp.asarray([True]))
        drafts = jnp.stack([x1, x2])[None].astype(jnp.int32)
        verdict = verify(k3, drafts, jnp.broadcast_to(q, (1, 2, 2)), jnp.broadcast_to(p, (1, 3, 2)), length)
        return jnp.where(verdict.accepted[0] > 0, x1, verdict.next_token[0])

    firsts = jax.jit(jax.vmap(one))(keys)
    return np.bincount(np.asarray(firsts), minlength=2)


def test_appendix_a_early_stop_is_lossless_and_global_search_is_not():
    n = 20_000
    ours = _first_token_distribution(True, n, seed=0)
    _, p_ours = stats.chisquare(ours, [0.7 * n, 0.3 * n])
    assert p_ours > 1e-3, (ours, p_ours)
    biased = _first_token_distribution(False, n, seed=1)
    # Without early stopping A is admitted (and accepted) whenever drafted: P(A) = 0.5 + 0.5 * 0.7.
    assert abs(biased[0] / n - 0.85) < 0.01, biased
    _, p_biased = stats.chisquare(biased, [0.7 * n, 0.3 * n])
    assert p_biased < 1e-12


def test_fixed_scheduler_verifies_g_tokens_of_active_rows():
    conf = jnp.asarray([[-9.0, 9.0, 9.0], [9.0, -9.0, 9.0], [9.0, 9.0, 9.0]])
    active = jnp.asarray([True, False, True])
    np.testing.assert_array_equal(scheduler_from_spec("fixed:2")(conf, active), [2, 0, 2])
    np.testing.assert_array_equal(scheduler_from_spec("fixed:5")(conf, active), [3, 0, 3])  # at most G
    for bad in ("fixed:0", "fixed:x", "fixed:"):
        with pytest.raises(ValueError, match="fixed takes a verify length >= 1"):
            scheduler_from_spec(bad)
