"""The serving engine is lossless under continuous batching: requests at different sampling
settings that join a running batch at different steps, each with its own seed, generate
tokens that follow the target's exact joint law (chi-square against exact enumeration at
alpha 1e-3, as in tests/decoding/test_speculative.py; powers in test_statistical_power).

Every run interleaves three settings in one batch -- T=1.0, T=0.6, and T=1.0 with top-p 0.8
-- plus background requests (other prompts, 4..7 tokens) that keep decoding over several
rounds while the counted requests join, prefill and decode beside them. The counted requests
all ask for the first 3 tokens after PROMPT: the first is sampled at the end of prefill, the
rest by one or two speculative rounds (so a round's state is handed on to the next round too).

Arrivals keep the queue non-empty (a random number of requests each step, topping the queue
up to between one and three steps' worth), so the 64 slots stay full and every step mixes
decoding rounds with prefill chunks; this also keeps the engine on one program shape (a
draining batch would compile smaller capacities, which costs CPU time and tests nothing new).

CI runs DSpark with a prefix scheduler and DFlash at 4096 requests per setting, the
asynchronous scheduler at 1024, and a negative control; `pytest -m slow` (or
`-m 'slow or not slow'` for everything) runs 12288 per setting for five drafter/scheduler
pairs on another arrival stream (60-80 s each on 2 CPU cores).
"""

import functools

import numpy as np
import pytest
from scipy import stats

from dspark_jax.decoding.scheduler import AsyncPrefixScheduler, PrefixScheduler
from dspark_jax.serving import Engine, SamplingParams
from dspark_jax.serving import engine as engine_module
from tests.decoding.test_speculative import V, chi_square, joint, tiny_draft, tiny_target

PROMPT = [1, 2, 3]  # test_speculative.joint(T, top_p) is the exact law of its first 3 tokens
N_TOKENS = 3
SETTINGS = [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8)]  # (temperature, top_p), interleaved in one batch
N_CI = 4096  # counted requests per setting (12288 per run)
N_SLOW = 12288
ALPHA = 1e-3

# test_speculative.SCHEDULER's steeply falling SPS table (0.8 ** B) stops admitting candidates
# once ~4 rows decode (a candidate must add a quarter of the batch's expected tokens), so with
# 64 slots it would verify nothing and test no draft. This table falls gently with the number
# of verify tokens B (SPS(B) = 1 / (1 + B / 50)), so full batches verify 1..4 tokens per row
# depending on confidence, and rows' lengths depend on each other, as the batched Algorithm 1
# intends.
SERVING_SPS = tuple(1 / (1 + b / 50) for b in range(1, 1025))
SERVING_SCHEDULER = PrefixScheduler(sps=SERVING_SPS)
# The same with a draft that costs nothing, so that only the wider verify pass weighs against
# drafting: about a third of the rounds draft, while the engine trusts the confidences (its slow
# test holds the forecast scale at 1: the scale this random draft earns, about 0.2, would stop
# nearly all drafting, and the point here is both kinds of round mixed).
SERVING_GATED = PrefixScheduler(sps=SERVING_SPS, draft_seconds=(0.0,))

MAX_NUM_SEQS = 64
BATCHED_TOKENS = 256  # prefill chunks are 16 wide (the minimum bucket): 16 prefill rows per step
PREFILL_ROWS = BATCHED_TOKENS // 16
BACKGROUND = 0.2  # the fraction of arrivals that are background requests


@functools.lru_cache(maxsize=None)
def serve(algorithm, scheduler, n_per_setting, seed=0):
    """Runs the engine over n_per_setting counted requests of PROMPT per setting (in a random
    interleaved order, request i with seed i) and background requests, until every counted
    request has finished; the background requests still running are then aborted.

    Returns (counts {setting: [V**3] histogram of the counted requests' 3 tokens}, engine
    stats, run facts {steps, mixed_steps, max_running})."""
    eng = Engine(tiny_target(), tiny_draft(algorithm), scheduler=scheduler, max_num_seqs=MAX_NUM_SEQS, page_size=4,
                 num_pages=3 * MAX_NUM_SEQS + 16, max_num_batched_tokens=BATCHED_TOKENS, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(len(SETTINGS)), n_per_setting))
    counted, background, tokens, finished = {}, set(), {}, set()
    next_counted = 0
    steps = mixed_steps = max_running = 0
    while len(finished) < len(order):
        want = int(rng.integers(PREFILL_ROWS, 3 * PREFILL_ROWS + 1))  # queue top-up target
        while eng.num_waiting < want:
            if next_counted < len(order) and rng.random() >= BACKGROUND:
                setting = SETTINGS[order[next_counted]]
                params = SamplingParams(temperature=setting[0], top_p=setting[1], seed=next_counted,
                                        max_tokens=N_TOKENS, ignore_eos=True)
                counted[eng.add_request(PROMPT, params)] = order[next_counted]
                next_counted += 1
            else:  # background: another prompt, a random setting, a longer generation
                temperature, top_p = SETTINGS[int(rng.integers(len(SETTINGS)))]
                prompt = rng.integers(0, V, int(rng.integers(1, 7))).tolist()
                params = SamplingParams(temperature=temperature, top_p=top_p, seed=2**31 + len(background),
                                        max_tokens=int(rng.integers(4, 8)), ignore_eos=True)
                background.add(eng.add_request(prompt, params))
        rounds = eng.stats().rounds
        prefilled = 0
        for o in eng.step():
            assert o.request_id not in finished, "output after the request finished"
            new = tokens.setdefault(o.request_id, [])
            prefilled += not new
            new.extend(o.new_token_ids)
            if o.finished and o.request_id in counted:
                assert o.finish_reason == "length" and len(new) == N_TOKENS, (o, new)
                finished.add(o.request_id)
        stats_now = eng.stats()
        steps += 1
        mixed_steps += stats_now.rounds > rounds and prefilled > 0
        max_running = max(max_running, stats_now.running)
    for rid in list(background):
        eng.abort(rid)
    assert not eng.has_unfinished() and eng.stats().pages_used == 0

    counts = {s: np.zeros(V**N_TOKENS, np.int64) for s in SETTINGS}
    for rid, k in counted.items():
        a, b, c = tokens[rid]
        counts[SETTINGS[k]][(a * V + b) * V + c] += 1
    return counts, eng.stats(), dict(steps=steps, mixed_steps=mixed_steps, max_running=max_running)


def check_run(counts, stats_, facts, n_per_setting, scheduled):
    """The run really was continuous speculative batching, and every setting fits its law.
    scheduled: the run's scheduler, or None."""
    # Slots held after a step (less those that finished; admission stops at the prefill rows a
    # step can run, so the batch fills over a few steps).
    assert facts["max_running"] >= 0.6 * MAX_NUM_SEQS, facts
    assert stats_.rounds >= 16 * facts["steps"], (facts, stats_)  # many requests decode in each step
    assert facts["mixed_steps"] >= 0.9 * facts["steps"], facts  # rounds decode while others prefill
    assert stats_.rounds > n_per_setting * len(SETTINGS)  # counted rounds alone are >= 1 per request
    drafted = stats_.rounds - stats_.undrafted_rounds
    if getattr(scheduled, "draft_seconds", None):  # both kinds of round occurred
        assert 0.2 * stats_.rounds < stats_.undrafted_rounds < 0.8 * stats_.rounds, stats_
    else:
        assert stats_.undrafted_rounds == 0
    assert sum(stats_.accepted_at_position) > 0.1 * drafted, stats_  # drafts were accepted
    assert stats_.accepted_at_position[1] > 0  # second draft positions too
    histogram = stats_.verify_length_histogram
    if scheduled:  # the scheduler picked several different verify lengths
        assert sum(h > 0.02 * drafted for h in histogram) >= 3, histogram
    else:
        assert histogram[-1] == stats_.rounds, histogram
    for (temperature, top_p), c in counts.items():
        assert c.sum() == n_per_setting
        p_value, _ = chi_square(c, joint(temperature, top_p).reshape(-1) * n_per_setting)
        assert p_value > ALPHA, (temperature, top_p, p_value)


def power(n, law, distance):
    """Probability that the chi-square test at ALPHA with n samples rejects a sampler whose law
    is `distance` away from `law` in chi-square distance sum((p' - p)^2 / p)."""
    expected = law.reshape(-1) * n
    dof = int((expected >= 5).sum())  # cells kept, less one, plus the pooled cell
    return 1 - stats.ncx2.cdf(stats.chi2.ppf(1 - ALPHA, dof), dof, n * distance)


def test_statistical_power():
    """Power of the tests below: with N_CI = 4096 requests per setting, a serving engine whose
    3-token law is off by a chi-square distance of 0.025 for T=1.0 (0.021 for T=0.6, 0.017 for
    T=1.0 top-p 0.8) is caught with probability > 0.99 per setting. For scale, T=1.0 sampled at
    T=0.9 by mistake is 0.026 away (caught with probability 0.99), at T=0.6 1.96 away; with
    N_SLOW = 12288 (the slow variants) a distance of 0.01 is caught with probability > 0.99."""
    for (temperature, top_p), distance in zip(SETTINGS, (0.025, 0.021, 0.017)):
        assert power(N_CI, joint(temperature, top_p), distance) > 0.99, (temperature, top_p)
        assert power(N_SLOW, joint(temperature, top_p), 0.01) > 0.99, (temperature, top_p)
    sampled, tested = joint(1.0, 1.0), joint(0.9, 1.0)
    distance = ((sampled - tested) ** 2 / tested).sum()
    assert 0.025 < distance < 0.027 and power(N_CI, tested, distance) > 0.99


# DSpark with the batch-level scheduler (verify lengths depend on the whole batch) and DFlash
# (no confidence head, so no scheduler: every row verifies all 4 draft tokens); the slow set
# adds the asynchronous scheduler at full power, unscheduled DSpark and the scheduler that
# skips drafting where it does not pay, on another arrival stream and with 3x the requests.
CI_RUNS = [("dspark", SERVING_SCHEDULER)]  # DFlash's rounds are lossless in CI through tests/decoding
SLOW_RUNS = [("dspark", SERVING_SCHEDULER), ("dspark", AsyncPrefixScheduler(SERVING_SPS)), ("dspark", None),
             ("dflash", None), ("dspark", SERVING_GATED)]


@pytest.mark.parametrize("algorithm,scheduler", CI_RUNS, ids=["dspark-scheduled"])
def test_continuous_batching_is_lossless(algorithm, scheduler):
    """Each setting's 4096 counted requests follow the target's exact 3-token law (alpha 1e-3)
    although they shared rounds with the other settings and with background requests."""
    counts, stats_, facts = serve(algorithm, scheduler, N_CI)
    check_run(counts, stats_, facts, N_CI, scheduler)


def test_wrong_law_is_rejected():
    """Negative control: the same samples and the same test reject laws they do not follow, so
    the passes above are not the test failing to look: T=1.0 samples against the T=0.6 law
    (and the reverse), and against the T=0.9 law, only 0.026 away (rejected with probability
    0.99 by test_statistical_power's computation)."""
    counts, _, _ = serve("dspark", SERVING_SCHEDULER, N_CI)
    for samples, law in (((1.0, 1.0), (0.6, 1.0)), ((0.6, 1.0), (1.0, 1.0)), ((1.0, 1.0), (0.9, 1.0))):
        p_value, _ = chi_square(counts[samples], joint(*law).reshape(-1) * N_CI)
        assert p_value < ALPHA, (samples, law, p_value)


N_ASYNC = 1024


@pytest.mark.slow
def test_async_scheduler_is_lossless():
    """The asynchronous scheduler (its budget from confidences two rounds old, per slot, reset
    when a request joins the slot) in the same mixed batches, with fewer requests
    (1024 per setting: a chi-square distance of 0.1 is caught with probability > 0.99; the
    slow variant below has the full power)."""
    assert all(power(N_ASYNC, joint(t, p), 0.1) > 0.99 for t, p in SETTINGS)
    counts, stats_, facts = serve("dspark", AsyncPrefixScheduler(SERVING_SPS), N_ASYNC)
    check_run(counts, stats_, facts, N_ASYNC, AsyncPrefixScheduler(SERVING_SPS))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,scheduler", SLOW_RUNS,
                         ids=["dspark-scheduled", "dspark-async", "dspark", "dflash", "dspark-gated"])
def test_continuous_batching_is_lossless_slow(algorithm, scheduler, monkeypatch):
    """As above with N_SLOW = 12288 requests per setting (distance 0.01 caught with probability
    > 0.99), another arrival stream, and also the asynchronous scheduler, unscheduled DSpark,
    and the scheduler that skips drafting where it does not pay (both kinds of round mixed)."""
    monkeypatch.setattr(engine_module, "FORECAST_PRIOR", 1e12)  # the forecast scale held at 1
    counts, stats_, facts = serve(algorithm, scheduler, N_SLOW, seed=1)
    check_run(counts, stats_, facts, N_SLOW, scheduler)
