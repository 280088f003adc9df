"""Tensor parallelism does not change what the engine generates: an `Engine` given a mesh
(weights split over its tensor axis, KV pages split by KV head where the heads divide it)
gives the same greedy tokens as on one device (fp32), autoregressive and DSpark with a prefix
scheduler, at tensor=2, 4 and 8, for 16 requests that arrive over several steps and share a
4-slot batch.

The main target has 8 query / 4 KV heads, so its KV pages (and its draft's) really are split
at tensor=2 and tensor=4 (checked on the pools' shardings); at tensor=8, and for the suite's
tiny target (4 query / 2 KV heads) at tensor=4, the KV heads are replicated, as vLLM does.
The meshes use the 8 fake CPU devices of tests/conftest.py (all of them, with a data axis, or
a subset). The last test checks that a mesh engine compiles one program per step shape.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import Draft, Target
from dspark_jax.models.draft_config import draft_config_for_target
from dspark_jax.serving import Engine, SamplingParams
from dspark_jax.sharding import make_mesh
from tests.decoding.test_speculative import TINY, V, scaled, tiny_draft, tiny_target
from tests.serving.test_lossless import SERVING_SCHEDULER

KV_SPLIT = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4, num_layers=2)  # KV heads divide tensor=2 and 4
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, V, int(RNG.integers(1, 14))).tolist() for _ in range(16)]


@functools.lru_cache(maxsize=None)
def kv_split_target():
    """2 layers of 8 query and 4 KV heads (small, so that its sharded programs compile fast)."""
    t = Target.random(KV_SPLIT, seed=3, dtype="float32")
    return Target(KV_SPLIT, scaled(t.params, 20), None, jnp.float32)


@functools.lru_cache(maxsize=None)
def kv_split_draft():
    """A 1-layer DSpark draft for it (its KV pages are split over the tensor axis too)."""
    target = kv_split_target()
    config = draft_config_for_target(KV_SPLIT, "dspark", (-1, 1), num_layers=1, block_size=4, mask_token_id=6,
                                    markov_rank=4)
    d = Draft.random(config, target=target, seed=2, dtype="float32")
    own = {k: v for k, v in d.params.items() if k not in ("embed_tokens", "lm_head")}
    return Draft(config, {**scaled(own, 10), **Draft.frozen(target.params)}, jnp.float32)


def models(name, speculative):
    """(target, draft, scheduler): the suite's tiny target or the KV-split one, autoregressive
    or with its DSpark draft and a prefix scheduler (one that verifies in batches of 4 rows:
    test_speculative.SCHEDULER verifies nothing once 4 rows decode)."""
    target = tiny_target() if name == "tiny" else kv_split_target()
    if not speculative:
        return target, None, None
    return target, tiny_draft("dspark") if name == "tiny" else kv_split_draft(), SERVING_SCHEDULER


def mesh(data, tensor):
    """A (data, 1, tensor) mesh over the first data * tensor of the 8 CPU devices."""
    return make_mesh(data=data, tensor=tensor, devices=jax.devices("cpu")[: data * tensor])


def serve(target, draft, scheduler, mesh=None):
    """Greedy tokens of PROMPTS through an engine of 4 slots, 2 requests arriving per step (so
    requests wait, join as others finish, and prefill beside decoding rounds); returns (tokens
    per prompt, engine)."""
    eng = Engine(target, draft, scheduler=scheduler, max_num_seqs=4, page_size=8, num_pages=24,
                 max_num_batched_tokens=32, mesh=mesh)
    ids, tokens, pending = {}, [[] for _ in PROMPTS], list(enumerate(PROMPTS))
    mixed = 0
    while pending or eng.has_unfinished():
        for _ in range(2):
            if pending:
                i, prompt = pending.pop(0)
                ids[eng.add_request(prompt, GREEDY)] = i
        rounds = eng.stats().rounds
        outs = eng.step()
        mixed += eng.stats().rounds > rounds and any(not tokens[ids[o.request_id]] for o in outs)
        for o in outs:
            tokens[ids[o.request_id]].extend(o.new_token_ids)
    assert mixed > 0  # some steps ran decoding rounds and finished prefills together
    assert eng.stats().pages_used == 0 and eng.stats().steps > len(PROMPTS) // 2
    return tokens, eng


@functools.lru_cache(maxsize=None)
def single_device(name):
    """The reference: greedy autoregressive tokens on one device (greedy DSpark gives the same:
    tests/decoding/test_speculative.py)."""
    tokens, _ = serve(*models(name, False))
    eos = models(name, False)[0].config.eos_token_ids
    assert any(t[-1] in eos for t in tokens) and any(len(t) == MAX_TOKENS for t in tokens)  # both endings
    return tokens


# (target, speculative, data, tensor): AR and DSpark at tensor=2 and 4 (KV pages split), AR
# at tensor=8 (8 query heads split, the 4 KV heads replicated), over all 8 devices or a subset.
# The suite's tiny target and draft (KV heads (2) replicated over tensor=4) are slow: their
# 4- and 5-layer programs take ~50 s to compile on 2 CPU cores. A sharded run compiles 3
# programs, ~2-5 s each (2 once the first step stops compiling its own: the last test).
CASES = [
    pytest.param("kv_split", False, 4, 2, marks=pytest.mark.slow),  # CI: data 2 x tensor 4 with DSpark
    ("kv_split", False, 1, 4),
    ("kv_split", False, 1, 8),
    pytest.param("kv_split", True, 1, 2, marks=pytest.mark.slow),  # CI: DSpark over data 2 x tensor 4
    ("kv_split", True, 2, 4),
    pytest.param("tiny", True, 2, 4, marks=pytest.mark.slow),
]


def case_id(case):
    name, speculative, data, tensor = case.values if hasattr(case, "values") else case
    return f"{name}-{'dspark' if speculative else 'ar'}-data{data}-tensor{tensor}"


@pytest.mark.parametrize("name,speculative,data,tensor", CASES, ids=[case_id(c) for c in CASES])
def test_tensor_parallel_greedy_equals_single_device(name, speculative, data, tensor):
    """Every request's greedy tokens equal one device's, and the weights and KV pools are laid
    out over the mesh as intended."""
    target, draft, scheduler = models(name, speculative)
    tokens, eng = serve(target, draft, scheduler, mesh(data, tensor))
    assert tokens == single_device(name)
    if speculative:
        assert sum(eng.stats().accepted_at_position) > 0  # the drafts were verified and accepted

    # The weights and pools really are split: query heads over the tensor axis, KV pages by
    # KV head where the heads divide it (else replicated).
    q_spec = eng.target.params["layers_0"]["self_attn"]["q_proj"].sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(q_spec)), q_spec
    pools = [eng.state.target_cache.k[0], eng.state.target_cache.v[-1]]
    if draft is not None:
        pools.append(eng.state.draft_cache.k[0])
    kv_split = target.config.num_kv_heads % tensor == 0
    assert kv_split == (name == "kv_split" and tensor < 8)
    for pool in pools:  # [pages, page_size, kv_heads, head_dim]
        assert pool.sharding.mesh.shape["tensor"] == tensor
        spec = tuple(pool.sharding.spec) + (None,) * (pool.ndim - len(pool.sharding.spec))
        assert spec[:2] == (None, None) and spec[3] is None, spec
        assert spec[2] in (("tensor", ("tensor",)) if kv_split else (None,)), spec
        assert {s.data.shape[2] for s in pool.addressable_shards} == {pool.shape[2] // (tensor if kv_split else 1)}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def compiles_of_engine_steps(run) -> list[str]:
    """JAX's log lines for each XLA compilation of the engine's programs (`engine_round`,
    `engine_prefill`) while `run()` runs (kept out of
    the test log: jax.log_compiles() lines are long)."""
    loggers = [logging.getLogger(name) for name in ("jax._src.dispatch", "jax._src.interpreters.pxla")]
    records = _Records()
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.propagate = False
    try:
        with jax.log_compiles():
            run()
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.removeHandler(records)
            lg.propagate = propagate
    return [m for m in records.messages if m.startswith(("Finished XLA compilation of jit(engine_round)",
                                                          "Finished XLA compilation of jit(engine_prefill)"))]


def test_sharded_engine_compiles_each_step_shape_once():
    """A mesh engine compiles one program per shape, as on one device: here 2 (a round and a
    prefill), as many as the shapes the engine counts. The first step must not compile its own
    program: that happens when the initial state is laid out differently from the states the steps
    return (the pools' block tables and lengths left on one device), and costs a full extra
    compile of the serving program (~2 s here, minutes for a real model)."""
    for m in (None, mesh(1, 2)):
        eng = Engine(kv_split_target(), None, max_num_seqs=2, page_size=8, num_pages=16, max_num_batched_tokens=16,
                     mesh=m, background_compile=False)  # 2 slots: shapes no other test here compiles; compiled
        # in this thread, where jax.log_compiles() sees it
        for _ in range(3):  # the third waits for a slot: steps with and without prefill
            eng.add_request([1, 2, 3], GREEDY)

        def run():
            while eng.has_unfinished():
                eng.step()

        compiles = compiles_of_engine_steps(run)
        assert eng.stats().steps > 3 and len(compiles) == eng.stats().program_shapes == 2, (
            "mesh" if m else "one device", compiles)
