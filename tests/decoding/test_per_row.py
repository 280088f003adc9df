"""Per-row sampling in one batch, per-row randomness, and what the jitted programs keep."""

import gc
import weakref

import jax
import numpy as np
import pytest

from dspark_jax import generate, load_target
from dspark_jax.decoding import generate as generate_module
from dspark_jax.decoding.scheduler import ThresholdScheduler
from dspark_jax.sampling import SamplingParams
from tests.decoding.test_speculative import V, chi_square, exact_joint, tiny_draft, tiny_target
from tests.helpers import tiny_path

PROMPT = [1, 2, 3]
# (temperature, top_k, top_p, rows): a greedy group and two sampled groups with their own filters.
GROUPS = [(0.0, 0, 1.0, 192), (0.6, 4, 1.0, 4000), (1.0, 0, 0.7, 4000)]


def test_rows_follow_their_own_sampling_parameters():
    """One speculative batch mixing three sampling settings: each group's first three tokens
    follow the target's exact joint law under that group's parameters (chi-square, alpha 1e-3),
    and the greedy rows all equal greedy autoregressive decoding."""
    target, draft = tiny_target(), tiny_draft("dspark")
    temperature, top_k, top_p = ([t for t, k, p, n in GROUPS for _ in range(n)],
                                 [k for t, k, p, n in GROUPS for _ in range(n)],
                                 [p for t, k, p, n in GROUPS for _ in range(n)])
    rows = len(temperature)
    result = generate(target, draft, [PROMPT] * rows, max_new_tokens=3, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=9, stop_ids=())
    outs = np.asarray(result.tokens)
    greedy = generate(target, None, [PROMPT], max_new_tokens=3, temperature=0.0, stop_ids=()).tokens[0]
    start = 0
    for t, k, p, n in GROUPS:
        group = outs[start:start + n]
        start += n
        if t == 0:
            assert (group == greedy).all()
            continue
        counts = np.bincount(group[:, 0] * V * V + group[:, 1] * V + group[:, 2], minlength=V**3)
        p_value, _ = chi_square(counts, exact_joint(target, PROMPT, 3, SamplingParams(t, k, p)).reshape(-1) * n)
        assert p_value > 1e-3, (t, k, p, p_value)
    assert sum(map(sum, result.accepted_lengths)) > 0.2 * rows  # the drafts did get accepted


def test_a_row_does_not_depend_on_its_batch():
    """A request's output is a function of its own seed: alone or among other requests, and in
    any row, it samples the same tokens."""
    target, draft = tiny_target(), tiny_draft("dspark")
    alone = generate(target, draft, [PROMPT], max_new_tokens=12, temperature=1.0, seed=[42], stop_ids=())
    mixed = generate(target, draft, [[5, 5], PROMPT, [6, 1, 2]], max_new_tokens=12, temperature=[0.5, 1.0, 0.0],
                     seed=[1, 42, 3], stop_ids=())
    assert mixed.tokens[1] == alone.tokens[0]


def test_verifying_nothing_is_autoregressive_sampling():
    """A scheduler that verifies no draft token leaves each round to the next-token stream,
    which plain autoregressive decoding uses too: the same seeds give the same samples."""
    target, draft = tiny_target(), tiny_draft("dspark")
    prompts = [PROMPT, [4, 5, 6, 1], [7, 0]]
    kwargs = dict(max_new_tokens=10, temperature=[1.0, 0.8, 0.6], top_p=[1.0, 0.9, 1.0], seed=[5, 6, 7], stop_ids=())
    spec = generate(target, draft, prompts, scheduler=ThresholdScheduler(1.01), **kwargs)
    assert all(v == 0 for row in spec.verify_lengths for v in row)
    assert spec.tokens == generate(target, None, prompts, **kwargs).tokens


def test_new_sampling_values_do_not_recompile():
    target, draft = tiny_target(), tiny_draft("dspark")
    traced = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: traced.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    run = lambda temperature, seed, top_k=3: generate(target, draft, [PROMPT, [4, 4]], max_new_tokens=6,
                                                      temperature=temperature, top_k=top_k, seed=seed)
    run([0.7, 0.0], 1)
    traced.clear()
    run([0.3, 1.2], 2)
    run([0.0, 0.9], 3)
    assert traced == []
    run([0.5, 0.5], 4, top_k=0)  # no row filters: the one static switch, so the counter does see traces
    assert traced


def test_dropped_target_frees_its_weights():
    """Compiled programs take the model's structure as their static argument, never its
    weights: once a target is dropped, its arrays are freed although its programs stay cached."""
    path = tiny_path("qwen3_gqa_untied")
    first = load_target(path, dtype="float32")
    generate(first, None, [PROMPT], max_new_tokens=4)
    refs = [weakref.ref(x) for x in jax.tree.leaves(first.params)]
    cached = generate_module._generate._cache_size()
    del first
    gc.collect()
    assert all(r() is None for r in refs)
    second = load_target(path, dtype="float32")
    assert generate(second, None, [PROMPT], max_new_tokens=4).tokens
    assert generate_module._generate._cache_size() == cached  # the second load reused the program


@pytest.mark.parametrize("bad,match", [(dict(temperature=[1.0, -1.0]), r"temperature\[1\] must be a number >= 0"),
                                       (dict(top_k=[1, 2, 3]), "top_k has 3 values for 2 prompts"),
                                       (dict(seed=[1, -1]), "seed must be an integer"),
                                       (dict(top_p=[0.5, 0.0]), r"top_p\[1\] must be in \(0, 1\]")])
def test_bad_per_row_values(bad, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_target(), None, [PROMPT, PROMPT], max_new_tokens=2, **bad)
