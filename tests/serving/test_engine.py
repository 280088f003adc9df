"""`Engine` serves exactly what the target alone would generate, whatever the batching does.

Requests arrive over many steps, queue for a few slots, prefill in chunks and are preempted
when a deliberately small KV pool runs out; at temperature 0 every request's tokens still
equal `generate`'s greedy output (tiny model with every drafter and scheduler, and SmolLM2's
real weights), and a seeded request samples the same tokens alone as in a busy mixed batch,
the same as `generate` with that seed. Aborting frees pages at once without disturbing the
other requests, and bad requests are refused with a ValueError naming the field (or
EngineFull) while the engine goes on serving correctly.
"""

import functools
import gc
import threading
import time
import weakref

import jax
import numpy as np
import pytest

from dspark_jax import Draft, generate
from dspark_jax.decoding import speculative
from dspark_jax.decoding.scheduler import AsyncPrefixScheduler, PrefixScheduler
from dspark_jax.decoding.speculative import resolve_kernels, use_kernels
from dspark_jax.models.draft_config import draft_config_for_target
from dspark_jax.serving import Engine, EngineFull, SamplingParams
from dspark_jax.serving import engine as engine_module
from dspark_jax.sharding import make_mesh
from tests.decoding.test_speculative import GATED, SCHEDULER, V, gemma_draft, gemma_target, tiny_draft, tiny_target

EOS = 7  # the tiny target's only EOS id
MAX_TOKENS = 16
# One engine shape for the tiny model throughout, so that the tests share compiled step
# programs (compiling dominates their time): 4 slots, pages of 16 positions with requests of at
# most 40 + 16 + gamma + 1 <= 64 positions (block tables stay 4 pages wide), 16 prefill tokens
# per step (one chunk of 16 per step: prompts of up to 40 tokens take three) and 8 usable
# pages, half of what 4 of the longest requests need, so the pool runs out and requests are
# preempted. `WIDE` (slow tests) lets the slots' capacity, the block tables and
# the prefill batch's rows vary too.
SMALL = dict(max_num_seqs=4, page_size=16, num_pages=9, max_num_batched_tokens=16, max_stop_ids=4)
WIDE = dict(max_num_seqs=8, page_size=8, num_pages=24, max_num_batched_tokens=32, max_stop_ids=4)
CONFIGS = {  # id: (drafter, scheduler)
    "ar": (None, None),
    "dspark": ("dspark", None),
    "dspark-prefix": ("dspark", SCHEDULER),
    "dspark-async": ("dspark", AsyncPrefixScheduler(SCHEDULER.sps)),
    "dspark-gated": ("dspark", GATED),  # drafts only in rounds where drafting pays
    "dflash": ("dflash", None),
    "eagle3": ("eagle3", None),
}

_rng = np.random.default_rng(0)
# 64 prompts of 1..40 tokens (7 is EOS, which may appear in a prompt too), and a max_tokens each.
PROMPTS = [_rng.integers(0, V, int(n)).tolist() for n in _rng.integers(1, 41, 64)]
LIMITS = [int(m) for m in _rng.integers(1, MAX_TOKENS + 1, 64)]


def greedy(max_tokens=MAX_TOKENS, **kwargs):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


@functools.lru_cache(maxsize=None)
def reference():
    """The target's own greedy continuation of each prompt, MAX_TOKENS long unless it stops at
    EOS; with max_tokens m a request's output is its first m tokens."""
    return generate(tiny_target(), None, PROMPTS, max_new_tokens=MAX_TOKENS, temperature=0.0).tokens


def expected(i, max_tokens):
    return reference()[i][:max_tokens]


def tiny_engine(config="dspark", **kwargs):
    drafter, scheduler = CONFIGS[config]
    return Engine(tiny_target(), None if drafter is None else tiny_draft(drafter), scheduler=scheduler,
                  **{**SMALL, **kwargs})


def serve(engine, requests, per_step=3, max_steps=5000):
    """Adds the (prompt, SamplingParams) requests per_step at a time while stepping until all
    have finished. Returns each request's tokens and finish reason, and the most requests seen
    waiting after a step; checks that outputs stop at the finishing one."""
    pending = list(enumerate(requests))
    index, tokens, reasons = {}, [[] for _ in requests], [None] * len(requests)
    most_waiting = 0
    for _ in range(max_steps):
        if not pending and not engine.has_unfinished():
            break
        for i, (prompt, params) in pending[:per_step]:
            index[engine.add_request(prompt, params)] = i
        del pending[:per_step]
        for out in engine.step():
            i = index[out.request_id]
            assert reasons[i] is None, "output after the request finished"
            tokens[i] += out.new_token_ids
            assert (out.finish_reason is not None) == out.finished
            reasons[i] = out.finish_reason
        most_waiting = max(most_waiting, engine.stats().waiting)
    else:
        raise AssertionError(f"not done after {max_steps} steps: {engine.stats()}")
    return tokens, reasons, most_waiting


def finish(engine, max_steps=1000):
    """Steps until no request is left; returns the tokens reported per request id."""
    tokens = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError(f"not done after {max_steps} steps: {engine.stats()}")


def assert_drained(engine):
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.pages_used, engine.num_queued) == (0, 0, 0, 0)
    assert stats.pages_free == engine.pages.usable == engine.pages.num_free


@pytest.mark.parametrize("config,shape,kernels", [pytest.param(c, SMALL, "xla", id=c) for c in CONFIGS] + [
    pytest.param("dspark-prefix", SMALL, "pallas", id="dspark-prefix-pallas")] + [
    pytest.param(c, SMALL, "pallas", id=f"{c}-pallas", marks=pytest.mark.slow) for c in ("ar", "dflash", "eagle3")] + [
    pytest.param(c, WIDE, "xla", id=f"{c}-wide", marks=pytest.mark.slow) for c in CONFIGS])
def test_greedy_equals_generate_under_queueing_chunking_and_preemption(config, shape, kernels):
    """kernels="pallas": the target and the draft attend with the Pallas kernel (interpreted on
    CPU), which reads only what a row's length reaches, so every program takes whole-context
    block tables (no program per table width)."""
    eng = tiny_engine(config, kernels=kernels, **shape)
    assert eng.target.config.attention == kernels
    tokens, reasons, most_waiting = serve(eng, [(p, greedy(m)) for p, m in zip(PROMPTS, LIMITS)])

    assert tokens == [expected(i, m) for i, m in enumerate(LIMITS)]
    assert reasons == ["stop" if t[-1] == EOS else "length" for t in tokens]
    assert "stop" in reasons and "length" in reasons
    assert all(len(t) == m for t, m, r in zip(tokens, LIMITS, reasons) if r == "length")
    # the load exercised what it is meant to: a queue, chunked prompts, preemptions
    stats = eng.stats()
    assert most_waiting > 0 and max(map(len, PROMPTS)) > shape["max_num_batched_tokens"]
    assert stats.preemptions > 0
    # each request's first token comes from its prefill, every other one from a round
    assert stats.tokens == sum(map(len, tokens)) - len(tokens)
    if CONFIGS[config][0] is not None:
        assert sum(stats.accepted_at_position) > 0  # draft tokens were accepted: not AR in disguise
        assert sum(stats.verify_length_histogram) == stats.rounds - stats.undrafted_rounds
        drafted = stats.rounds - stats.undrafted_rounds
        if config == "dspark-gated":  # the gate decides both ways, many times each
            assert min(stats.undrafted_rounds, drafted) >= 20, (stats.undrafted_rounds, drafted)
        else:
            assert stats.undrafted_rounds == 0
    if kernels == "pallas":
        assert {exact[0] for _, _, exact in eng._programs._ready} == {eng.max_pages}  # every program's table columns
    assert_drained(eng)


@pytest.mark.parametrize("config", ["ar", pytest.param("dspark-gated", marks=pytest.mark.slow)])
def test_a_precompiled_engine_never_waits_for_a_compilation(config):
    """Engine.precompile compiles the largest shapes; then every step runs its own program or,
    while that compiles in the background, a larger one padded, and the tokens are the same.
    (CI runs the AR engine; the speculative one, with its drafting programs, compiles about
    three times as many programs and runs in the full set.)"""
    eng = tiny_engine(config, **WIDE)  # shapes of 4 and 8 slots, chunks of 1 x 32 and 2 x 16 tokens
    eng.precompile(wait=True)
    precompiled = eng.stats().program_shapes
    tokens, _, _ = serve(eng, [(p, greedy(m)) for p, m in zip(PROMPTS, LIMITS)])
    assert tokens == [expected(i, m) for i, m in enumerate(LIMITS)]
    eng._programs.wait()
    stats = eng.stats()
    assert stats.compile_stalls == 0 and stats.program_shapes > precompiled  # the steps' own shapes came later
    assert_drained(eng)


@pytest.mark.parametrize("kernels", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_gemma4_greedy_equals_generate(kernels):
    """Gemma4 in the engine: its sliding-window layers keep every position in their pages and
    mask by window; `generate` keeps them in rings. Prompts far longer than the window."""
    prompts, limits = PROMPTS[:16], LIMITS[:16]
    ref = generate(gemma_target(), None, prompts, max_new_tokens=MAX_TOKENS, temperature=0.0).tokens
    eng = Engine(gemma_target(), gemma_draft("dspark"), kernels=kernels, **SMALL)
    tokens, _, _ = serve(eng, [(p, greedy(m)) for p, m in zip(prompts, limits)])
    assert tokens == [r[:m] for r, m in zip(ref, limits)]
    assert eng.stats().preemptions > 0 and sum(eng.stats().accepted_at_position) > 0
    assert_drained(eng)


CHAT = ["What is the capital of France?", "Compute 12 * 7 and explain briefly.", "Name three primary colours.",
        "Write a haiku about the sea.", "What is 2 + 2?", "Who wrote Hamlet?"]


# CI: SmolLM2 reaches the engine through serve.py (tests/serving/test_server.py's greedy chat against `generate`)
@pytest.mark.parametrize("speculative", [pytest.param(False, marks=pytest.mark.slow),
                                         pytest.param(True, marks=pytest.mark.slow)], ids=["ar", "dspark-prefix"])
def test_smollm2_greedy_equals_generate(smollm2, speculative):
    tok = smollm2.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for m in CHAT]
    draft, scheduler = None, None
    if speculative:  # a random draft, sharing SmolLM2's embedding and LM head
        config = draft_config_for_target(smollm2.config, "dspark", (1, 8, 15, 22, 28), block_size=4,
                                         mask_token_id=smollm2.config.vocab_size - 1)
        draft = Draft.random(config, target=smollm2, seed=0, dtype="float32")
        scheduler = PrefixScheduler(tuple(0.9 ** i for i in range(64)))
    ref = generate(smollm2, None, prompts, max_new_tokens=12, temperature=0.0).tokens
    # chat prompts are 34..41 tokens: three chunks each, while the other slots decode
    eng = Engine(smollm2, draft, scheduler=scheduler, max_num_seqs=3, page_size=16, num_pages=13,
                 max_num_batched_tokens=16)
    tokens, reasons, _ = serve(eng, [(p, greedy(12)) for p in prompts], per_step=2)
    assert tokens == ref
    assert tok.decode(tokens[0], skip_special_tokens=True).startswith("The capital of France is Paris")
    assert reasons == ["stop" if t[-1] in smollm2.config.eos_token_ids else "length" for t in tokens]
    assert_drained(eng)


@pytest.mark.parametrize("config", ["ar", "dspark"])
def test_seeded_request_samples_the_same_alone_and_in_a_busy_batch(config):
    rng = np.random.default_rng(1)
    mine = (PROMPTS[3], SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True))
    others = [(PROMPTS[i], SamplingParams(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.5])),
                                          top_p=float(rng.choice([1.0, 0.9, 0.5])),
                                          top_k=int(rng.choice([0, 0, 3])),
                                          seed=None if rng.random() < 0.5 else int(rng.integers(2**32)),
                                          max_tokens=int(rng.integers(1, MAX_TOKENS + 1))))
              for i in rng.permutation(len(PROMPTS))[:20]]

    assert any(params.filtered for _, params in others)  # steps with mine run the top-k/top-p program

    (alone,), _, _ = serve(tiny_engine(config), [mine])
    busy_engine = tiny_engine(config, num_pages=6)  # 5 usable pages: preemptions
    busy, _, _ = serve(busy_engine, others[:10] + [mine] + others[10:])
    assert busy[10] == alone and len(alone) == MAX_TOKENS
    # planning each step before the last one is read back changes which requests share a step
    # and when they are preempted, never their tokens (unseeded requests get the same seeds)
    sync_engine = tiny_engine(config, async_scheduling=False, num_pages=6)
    assert serve(sync_engine, others[:10] + [mine] + others[10:])[0] == busy
    assert sync_engine.stats().preemptions > 0
    # the draws do depend on the seed
    (reseeded,), _, _ = serve(tiny_engine(config), [(mine[0], SamplingParams(
        temperature=1.0, seed=1235, max_tokens=MAX_TOKENS, ignore_eos=True))])
    assert reseeded != alone


@pytest.mark.parametrize("config", ["ar", "dspark"])
def test_sampling_equals_generate_with_the_same_seeds(config):
    """A request's key is jax.random.key(seed), as for generate's per-prompt seed list."""
    rng = np.random.default_rng(2)
    n = 24
    seeds = [int(s) for s in rng.integers(2**32, size=n)]
    temperatures = [float(t) for t in rng.choice([0.6, 1.0, 1.3], n)]
    top_ps = [float(p) for p in rng.choice([1.0, 0.8], n)]
    drafter, scheduler = CONFIGS[config]
    ref = generate(tiny_target(), None if drafter is None else tiny_draft(drafter), PROMPTS[:n],
                   max_new_tokens=MAX_TOKENS, temperature=temperatures, top_p=top_ps, seed=seeds,
                   scheduler=scheduler).tokens
    eng = tiny_engine(config)
    tokens, _, _ = serve(eng, [(p, SamplingParams(temperature=t, top_p=q, seed=s, max_tokens=MAX_TOKENS))
                               for p, t, q, s in zip(PROMPTS, temperatures, top_ps, seeds)])
    assert tokens == ref
    assert tokens != reference()[:n]  # sampled, not greedy
    assert eng.stats().preemptions > 0


def test_pool_far_too_small_for_the_load():
    """200 requests arriving 10 per step, through a pool that two of the longest fill."""
    rng = np.random.default_rng(3)
    picks = [(int(i), int(m)) for i, m in zip(rng.integers(len(PROMPTS), size=200), rng.integers(1, 13, 200))]
    eng = tiny_engine("dspark")
    tokens, reasons, most_waiting = serve(eng, [(PROMPTS[i], greedy(m)) for i, m in picks], per_step=10)
    assert tokens == [expected(i, m) for i, m in picks]
    assert reasons == ["stop" if t[-1] == EOS else "length" for t in tokens]
    assert eng.stats().preemptions > 0 and most_waiting > 100
    assert_drained(eng)


def test_abort_frees_pages_and_leaves_other_requests_alone():
    eng = tiny_engine("dspark")
    # a request still prefilling: its first chunk of 16 tokens is in one page
    long_prompt = next(i for i, p in enumerate(PROMPTS) if len(p) > SMALL["max_num_batched_tokens"])
    rid = eng.add_request(PROMPTS[long_prompt], greedy())
    assert eng.step() == [] and eng.stats().running == 1 and eng.stats().pages_used == 1
    assert eng.abort(rid) and not eng.has_unfinished()
    assert_drained(eng)

    # one that has produced tokens, among 6 requests for 4 slots
    victim = next(i for i, t in enumerate(reference()) if len(t) == MAX_TOKENS)
    keep = [i for i in range(6) if i != victim][:5]
    ids = {eng.add_request(PROMPTS[victim], greedy()): victim}
    ids.update({eng.add_request(PROMPTS[i], greedy()): i for i in keep})
    victim_id = next(iter(ids))
    got = {i: [] for i in ids.values()}
    while len(got[victim]) < 3:
        assert eng.stats().steps < 100, "the request produced no tokens"
        for out in eng.step():
            got[ids[out.request_id]] += out.new_token_ids
    before = eng.stats()
    assert before.waiting > 0
    assert eng.abort(victim_id)
    after = eng.stats()
    assert after.pages_used < before.pages_used and after.running == before.running - 1
    assert got[victim] == expected(victim, len(got[victim]))

    # a waiting request: nothing to free, it just leaves the queue
    waiting_id = eng.add_request(PROMPTS[10], greedy())
    assert eng.stats().waiting == after.waiting + 1
    assert eng.abort(waiting_id) and eng.stats().waiting == after.waiting
    assert eng.stats().pages_used == after.pages_used

    assert not eng.abort(victim_id) and not eng.abort(waiting_id) and not eng.abort("no such request")
    rest = finish(eng)
    assert victim_id not in rest and set(rest) <= set(ids)
    assert {i: got[i] + rest.get(rid, []) for rid, i in ids.items() if i != victim} == {
        i: expected(i, MAX_TOKENS) for i in keep}
    assert_drained(eng)
    # an aborted request's id can be used again
    (again,), _, _ = serve(eng, [(PROMPTS[victim], greedy())])
    assert again == expected(victim, MAX_TOKENS)


def test_preempted_requests_wait_outside_the_queue_bound():
    """A preempted request goes back to the front of the queue without taking one of its
    `max_waiting` places: with one waiting after a preemption, two new requests are still
    accepted (a third is refused), and all finish with their greedy answers."""
    # 4 usable pages: two long requests do not fit. (Synchronous scheduling: asynchronous
    # planning books the first request's fourth page before the second is admitted, so the
    # second waits instead of being preempted.)
    eng = tiny_engine("dspark", max_waiting=2, num_pages=5, async_scheduling=False)
    longest = sorted(range(len(PROMPTS)), key=lambda i: -len(PROMPTS[i]))[:4]
    index = {eng.add_request(PROMPTS[i], greedy()): i for i in longest[:2]}
    tokens = {}
    for _ in range(100):  # until a preempted request waits
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if eng.num_waiting > eng.num_queued:
            break
    assert eng.num_waiting == 1 and eng.num_queued == 0 and eng.stats().preemptions == 1
    index.update({eng.add_request(PROMPTS[i], greedy()): i for i in longest[2:]})
    with pytest.raises(EngineFull):
        eng.add_request(PROMPTS[0], greedy())
    for rid, new in finish(eng).items():
        tokens.setdefault(rid, []).extend(new)
    assert {index[r]: t for r, t in tokens.items()} == {i: expected(i, MAX_TOKENS) for i in longest}
    assert_drained(eng)


def test_bad_kernels_settings_are_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        tiny_engine("ar", kernels="triton")
    mesh = make_mesh(tensor=2, devices=jax.devices("cpu")[:2])
    with pytest.raises(ValueError, match="kernels='pallas' cannot run here: the kernels run on one device"):
        tiny_engine("ar", kernels="pallas", mesh=mesh)
    assert tiny_engine("ar", mesh=mesh).target.config.attention == "xla"  # the default under a mesh
    assert tiny_engine("ar").target.config.attention == "xla"  # and on a CPU


def test_auto_kernels_are_the_pallas_ones_on_one_gpu(monkeypatch):
    """kernels="auto" (the default) picks the kernels on one GPU when they take the target's
    and the draft's shapes, with a draft or without; XLA under a mesh or for a head dim or a
    Markov rank they do not take."""
    target, draft = tiny_target(), tiny_draft("dspark")  # built before the backend is patched
    monkeypatch.setattr(speculative.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(speculative, "unsupported_attention", lambda head_dim, page, width: None)
    monkeypatch.setattr(speculative, "unsupported_markov", lambda rank: None)
    assert resolve_kernels("auto", target, None) == "pallas"
    assert resolve_kernels("auto", target, draft) == "pallas"
    assert resolve_kernels("pallas", target, draft) == "pallas" and resolve_kernels("xla", target, None) == "xla"
    mesh = make_mesh(tensor=2, devices=jax.devices("cpu")[:2])
    assert resolve_kernels("auto", target, None, mesh=mesh) == "xla"
    monkeypatch.setattr(speculative, "unsupported_attention", lambda head_dim, page, width: f"head dim {head_dim}")
    assert resolve_kernels("auto", target, None) == "xla"
    with pytest.raises(ValueError, match="kernels='pallas' cannot run here: head dim"):
        use_kernels(target, draft, "pallas")
    monkeypatch.setattr(speculative, "unsupported_attention", lambda head_dim, page, width: None)
    eng = Engine(target, None, **SMALL, background_compile=False)  # the engine takes what "auto" resolves to
    assert eng.target.config.attention == "pallas" and eng._full_tables
    eng = Engine(target, draft, scheduler=SCHEDULER, **SMALL, background_compile=False)
    assert eng.target.config.attention == eng.draft.config.layers.attention == "pallas" and eng._full_tables
    monkeypatch.setattr(speculative, "unsupported_markov", lambda rank: f"Markov rank {rank}")
    assert resolve_kernels("auto", target, draft) == "xla" and resolve_kernels("auto", target, None) == "pallas"


def test_bad_requests_are_refused_and_the_engine_serves_on():
    eng = tiny_engine("dspark", max_waiting=2)
    bad = [  # (prompt, params, what the message names)
        ([1] * eng.max_model_len, greedy(), "max_model_len"),
        ([], greedy(), "prompt_ids is empty"),
        ([1, V], greedy(), "prompt_ids has 8"),
        ([1, -1], greedy(), "prompt_ids has -1"),
        ([1, 2], greedy(stop_token_ids=(0, 1, 2, 3)), "stop_token_ids"),  # 5 stop ids with EOS > max_stop_ids 4
        ([1, 2], greedy(stop_token_ids=(V,)), "stop_token_ids"),
        ([1, 2], greedy(max_tokens=1000), "max_tokens=1000"),  # 16 pages: more than the pool has
        ([1, 2], "greedy", "params must be"),
    ]
    bad_params = [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
                  (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                  (dict(top_k=-1), "top_k"), (dict(top_k=2**31), "top_k"), (dict(top_p=1e-46), "top_p"),
                  (dict(seed=-1), "seed"), (dict(seed=2**32), "seed")]
    served = 0

    def serve_one():
        """The engine still serves: the next prompt's greedy continuation, exactly."""
        nonlocal served
        (tokens,), _, _ = serve(eng, [(PROMPTS[served], greedy())])
        assert tokens == expected(served, MAX_TOKENS)
        served += 1

    for prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            eng.add_request(prompt, params)
        assert not eng.has_unfinished()
        serve_one()
    for kwargs, field in bad_params:
        with pytest.raises(ValueError, match=f"^{field} must be"):
            SamplingParams(**kwargs)
        serve_one()

    ids = {eng.add_request(PROMPTS[40], greedy(), request_id="mine"): 40}
    with pytest.raises(ValueError, match="request_id 'mine' is already in use"):
        eng.add_request(PROMPTS[41], greedy(), request_id="mine")
    ids[eng.add_request(PROMPTS[42], greedy())] = 42
    with pytest.raises(EngineFull, match="queue is full"):
        eng.add_request(PROMPTS[43], greedy())
    assert eng.stats().waiting == 2
    assert finish(eng) == {rid: expected(i, MAX_TOKENS) for rid, i in ids.items()}
    serve_one()
    assert_drained(eng)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_step_returns_what_the_previous_launch_committed(async_scheduling):
    """Asynchronous scheduling launches step n + 1 before reading step n back, so each step
    returns the previous one's tokens; synchronous scheduling returns its own. A request whose
    prompt is one chunk gets its first token and a round's in its first step."""
    eng = tiny_engine("ar", async_scheduling=async_scheduling)
    i = next(i for i, p in enumerate(PROMPTS) if len(p) <= SMALL["max_num_batched_tokens"])
    rid = eng.add_request(PROMPTS[i], greedy(3))  # a prefill chunk and a round, then a round
    start = time.perf_counter()
    first = eng.step()
    between = time.perf_counter()
    second = eng.step()
    outside = time.perf_counter() - between  # the gap between the calls is not counted
    assert eng.stats().steps == 2
    assert 0 < eng.stats().step_seconds <= (between - start) + outside
    assert 0 < eng.stats().wait_seconds < eng.stats().step_seconds  # reading a launch back is part of a step
    assert eng.stats().program_shapes == 2  # the first step's prefill and round; the second reran that round
    assert [o.new_token_ids for o in first + second] == [expected(i, 3)[:1], expected(i, 3)[1:2]] + (
        [] if async_scheduling else [expected(i, 3)[2:3]])
    rest = finish(eng).get(rid, [])
    assert [t for o in first + second for t in o.new_token_ids] + rest == expected(i, 3)
    assert_drained(eng)


@pytest.mark.parametrize("rounds", [1, pytest.param(3, marks=pytest.mark.slow)],  # CI: serve.py's default
                         ids=["one-round-steps", "three-round-steps"])
def test_a_request_runs_to_the_end_of_the_context(rounds):
    """Planning on the tokens steps in flight may commit never asks for pages past a request's
    last position: a prompt plus max_tokens filling max_model_len, whose pages end exactly
    where a verify block after the last token does, in a pool with pages to spare (SMALL's: 8
    usable, 4 needed; block tables 4 pages wide, as in the greedy test above, whose programs
    this engine shares)."""
    eng = tiny_engine("dspark", max_model_len=4 * SMALL["page_size"] - 5, num_scheduler_steps=rounds)
    prompt = PROMPTS[0][:10]
    max_tokens = eng.max_model_len - len(prompt)
    assert (eng.max_model_len + eng.gamma + 1) % eng.page_size == 0 and eng.gamma >= 3
    (tokens,), _, _ = serve(eng, [(prompt, greedy(max_tokens, ignore_eos=True))])
    assert tokens == generate(tiny_target(), None, [prompt], max_new_tokens=max_tokens, temperature=0.0,
                              stop_ids=()).tokens[0]
    assert_drained(eng)


@pytest.mark.slow  # CI: several rounds a step with sampled tokens (below)
def test_several_rounds_per_step_keep_greedy_tokens():
    """With num_scheduler_steps rounds per step (the scheduler's state carried from round to
    round), requests are admitted, preempted and finished (at EOS or max_tokens, in any of a
    step's rounds) at other times than with one, and still get generate's tokens."""
    eng = tiny_engine("dspark-async", num_scheduler_steps=3, num_pages=6)  # 5 usable pages: preemptions
    tokens, reasons, _ = serve(eng, [(p, greedy(m)) for p, m in zip(PROMPTS, LIMITS)])
    assert tokens == [expected(i, m) for i, m in enumerate(LIMITS)]
    assert reasons == ["stop" if t[-1] == EOS else "length" for t in tokens]
    stats = eng.stats()
    assert stats.preemptions > 0
    assert stats.tokens == sum(map(len, tokens)) - len(tokens)  # every round's tokens, once
    assert stats.rounds > 2 * stats.steps  # several rounds per step, not one
    assert_drained(eng)


def test_undrafted_steps_of_several_rounds_keep_greedy_tokens():
    """With the gate, a step that does not draft runs its rounds with the draft taking in the
    pending positions once, before them (`catch_up=False`); greedy tokens stay generate's."""
    eng = tiny_engine("dspark-gated", num_scheduler_steps=3)
    tokens, _, _ = serve(eng, [(p, greedy(m)) for p, m in zip(PROMPTS, LIMITS)])
    assert tokens == [expected(i, m) for i, m in enumerate(LIMITS)]
    stats = eng.stats()
    drafted = stats.rounds - stats.undrafted_rounds
    assert min(stats.undrafted_rounds, drafted) >= 40 and stats.rounds > 2 * stats.steps  # both kinds, many times
    assert_drained(eng)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_draft_that_never_pays_is_probed_ever_more_rarely(monkeypatch, async_scheduling):
    """Drafting never pays here: after the first step (and, with asynchronous scheduling, the
    one launched before the first read-back), one drafted step (a probe) follows gaps of 2, 4,
    8, ... undrafted steps, up to PROBE_LIMIT rounds (8 here, in steps of 2 rounds)."""
    monkeypatch.setattr(engine_module, "PROBE_LIMIT", 8)
    never = PrefixScheduler(SCHEDULER.sps, draft_seconds=(1e9,))
    rounds = 2
    eng = Engine(tiny_target(), tiny_draft("dspark"), scheduler=never, max_num_seqs=1, page_size=32, num_pages=6,
                 async_scheduling=async_scheduling, num_scheduler_steps=rounds)
    eng.add_request(PROMPTS[0][:8], greedy(max_tokens=48, ignore_eos=True))
    kinds, before = "", eng.stats()
    while eng.has_unfinished():
        eng.step()
        now = eng.stats()
        if now.rounds > before.rounds:
            kinds += "U" if now.undrafted_rounds > before.undrafted_rounds else "D"
        before = now
    expected, gap = "DD" if async_scheduling else "D", 2
    while len(expected) < len(kinds):
        expected += "U" * gap + "D"
        gap = min(2 * gap, 8 // rounds)
    assert kinds == expected[:len(kinds)] and len(kinds) >= 20, kinds  # gaps of 2, 4, 4, 4


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_requests_one_after_another_draft_only_to_probe(async_scheduling):
    """One request at a time, drafting never paying: only the first request drafts its first
    step (two with asynchronous scheduling, the second launched before the first is read
    back). A later one does not: it counts as the last drafted round's rows, and the step that
    finished the request before decides for the rows that ran. So the drafted steps are the
    probes, after gaps of undrafted steps that never shrink (2, 4, 8, ...)."""
    never = PrefixScheduler(SCHEDULER.sps, draft_seconds=(1e9,))
    eng = Engine(tiny_target(), tiny_draft("dspark"), scheduler=never, max_num_seqs=1, page_size=32, num_pages=6,
                 async_scheduling=async_scheduling, num_scheduler_steps=2)
    kinds, before = [], eng.stats()
    for prompt in PROMPTS[:4]:
        kinds.append("")
        eng.add_request(prompt[:8], greedy(max_tokens=12, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
            now = eng.stats()
            if now.rounds > before.rounds:
                kinds[-1] += "U" if now.undrafted_rounds > before.undrafted_rounds else "D"
            before = now
    first = "DD" if async_scheduling else "D"
    assert kinds[0].startswith(first + "UU") and not any(k.startswith("D") for k in kinds[1:]), kinds
    gaps = [len(run) for run in "".join(kinds)[len(first):].split("D")[:-1]]
    assert len(gaps) == 3 and gaps[0] == 2 and gaps == sorted(gaps), kinds


def test_the_drafting_decision_learns_how_far_the_confidences_over_forecast(monkeypatch):
    """A draft whose confidence head calls every token surely accepted (logit 20) forecasts
    every verified token as accepted; with this table drafting pays only above 2 accepted tokens
    a round. Trusting its confidences (the forecast scale held at 1) the engine drafts every
    round. Learning, it finds the scale that its rounds' counts give in float64 (accepted over
    verified draft tokens, as every survival is 1, plus the prior: no decay here, and no stop
    token, EOS ignored) and drafts only to probe. Greedy tokens stay the target's either way."""
    draft = tiny_draft("dspark")
    head = draft.params["confidence_head"]
    sure = {**head, "proj": {"bias": np.full((1,), 20.0, np.float32), "kernel": np.zeros_like(head["proj"]["kernel"])}}
    draft = Draft(draft.config, {**draft.params, "confidence_head": sure}, draft.dtype)
    scheduler = PrefixScheduler(sps=(1000.0,) * 64, draft_seconds=(0.002,))  # pays above 0.002 * 1000 accepted
    monkeypatch.setattr(engine_module, "FORECAST_MEMORY", 1e12)
    requests = [(p, greedy(m, ignore_eos=True)) for p, m in zip(PROMPTS, LIMITS)]
    target_alone = generate(tiny_target(), None, PROMPTS, max_new_tokens=MAX_TOKENS, temperature=0.0,
                            stop_ids=(-1,)).tokens
    for prior in (engine_module.FORECAST_PRIOR, 1e12):
        monkeypatch.setattr(engine_module, "FORECAST_PRIOR", prior)
        eng = Engine(tiny_target(), draft, scheduler=scheduler, **SMALL)
        tokens, _, _ = serve(eng, requests)
        assert tokens == [t[:m] for t, m in zip(target_alone, LIMITS)]
        stats = eng.stats()
        verified = sum(length * n for length, n in enumerate(stats.verify_length_histogram))
        scale = (sum(stats.accepted_at_position) + prior) / (verified + prior)
        assert stats.forecast_scale == pytest.approx(scale, rel=1e-6)
        if prior == 1e12:  # the confidences trusted
            assert stats.undrafted_rounds == 0
        else:  # this random draft accepts about one token in twenty
            assert scale < 0.2 and stats.undrafted_rounds > 0.8 * stats.rounds
        assert_drained(eng)


def test_several_rounds_per_step_keep_sampled_tokens():
    """Seeded sampled requests (mixed temperatures and top_p) get the same tokens with three
    rounds per step as with one. (With a scheduler they may not: the verify lengths it picks
    depend on which requests share a round, and so do the draws that follow.)"""
    rng = np.random.default_rng(3)
    sampled = [(PROMPTS[i], SamplingParams(temperature=float(rng.choice([0.0, 0.6, 1.0])),
                                           top_p=float(rng.choice([1.0, 0.8])), seed=int(rng.integers(2**32)),
                                           max_tokens=int(rng.integers(1, MAX_TOKENS + 1))))
               for i in range(24)]
    eng = tiny_engine("dspark", num_scheduler_steps=3)
    several = serve(eng, sampled)[0]
    assert several == serve(tiny_engine("dspark"), sampled)[0]
    assert several != [expected(i, p.max_tokens) for i, (_, p) in enumerate(sampled)]  # sampled, not greedy
    assert eng.stats().rounds > 2 * eng.stats().steps
    assert_drained(eng)


def test_abort_while_a_step_is_in_flight():
    """A request aborted right after a step launched frees its pages at once; a request that
    takes them in the next step gets its own tokens."""
    eng = tiny_engine("dspark")
    victim = eng.add_request(PROMPTS[5], greedy(ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.stats().rounds > 0 and eng.stats().pages_used > 0
    assert eng.abort(victim) and eng.stats().pages_used == 0
    again = [(PROMPTS[i], greedy()) for i in range(4)]
    tokens, _, _ = serve(eng, again)
    assert tokens == [expected(i, MAX_TOKENS) for i in range(4)]
    assert_drained(eng)


def test_generated_request_ids_avoid_the_callers_ids():
    """A request added without an id gets one that no known request has."""
    eng = tiny_engine("ar")
    ids = {eng.add_request(PROMPTS[0], greedy(), request_id="1"): 0}
    ids.update({eng.add_request(PROMPTS[i], greedy()): i for i in (1, 2)})
    assert len(ids) == 3
    assert finish(eng) == {rid: expected(i, MAX_TOKENS) for rid, i in ids.items()}


def test_a_dropped_engine_is_freed_with_its_programs_thread():
    """Its programs hold it weakly, so dropping the last reference frees the engine (and its
    KV pool) at once, and its compile thread ends."""
    eng = tiny_engine("ar", **WIDE)
    eng.precompile()
    ref, threads = weakref.ref(eng), threading.active_count()
    gc.disable()
    try:
        del eng
        assert ref() is None
    finally:
        gc.enable()
    for _ in range(100):
        if threading.active_count() < threads:
            break
        time.sleep(0.1)
    assert threading.active_count() < threads


def test_freeze_heap_collects_garbage_then_exempts_what_is_alive():
    """A serving process freezes its heap once built: garbage then is collected first, and
    what is alive is not walked (nor, in a cycle, freed) by later collections."""

    class Node:
        pass

    garbage, kept = Node(), Node()
    garbage.self, kept.self = garbage, kept  # cycles: only the collector frees them
    dead, alive = weakref.ref(garbage), weakref.ref(kept)
    del garbage
    try:
        seconds, frozen = engine_module.freeze_heap()
        assert dead() is None and seconds > 0 and frozen == gc.get_freeze_count() > 0
        del kept
        gc.collect()
        assert alive() is not None  # frozen: the collection did not look at it
    finally:
        gc.unfreeze()
    gc.collect()
    assert alive() is None


def test_a_slow_step_is_logged_with_its_programs(caplog, monkeypatch):
    """A step far slower than the mean so far, with no compilation waited for, is logged with
    the programs it launched and read back; a program's first run is marked as such."""
    eng = tiny_engine("ar", async_scheduling=False)
    rid = eng.add_request(PROMPTS[0], greedy(60, ignore_eos=True))
    for _ in range(engine_module.SLOW_STEP_AFTER + 5):
        eng.step()
    commit = eng._commit

    def slow_commit(launch):  # a read-back that waits 2 s, once
        monkeypatch.setattr(eng, "_commit", commit)
        time.sleep(2.0)
        return commit(launch)

    monkeypatch.setattr(eng, "_commit", slow_commit)
    with caplog.at_level("INFO", logger="dspark_jax.serving.engine"):
        eng.step()
    (record,) = [r for r in caplog.records if "a step took" in r.getMessage()]
    message = record.getMessage()
    assert int(message.split("a step took ")[1].split(" ms")[0]) >= 2000
    assert "launched round (4,)" in message and "read back round (4,)" in message and "first run" not in message
    finish(eng)
    assert eng.stats().pages_used == 0 and not eng.has_unfinished() and rid
    key = ("round", (4,), (2, False, True))
    first = engine_module._Launch([], [], [], programs=[key], first_runs=[key])
    assert engine_module._describe([first]) == "round (4,) (2, False, True) (its first run)"
