"""The engine's rounds timed, and a serving table calibrated to them."""

import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding.scheduler import PrefixScheduler, speculation_pays
from dspark_jax.serving.engine import Engine
from dspark_jax.serving.round_times import calibrate, decoding_from
from dspark_jax.serving.step import engine_round
from tests.decoding.test_speculative import tiny_draft, tiny_target


def test_calibrate_by_hand():
    """Every verify pass of a row count moves by what its undrafted round adds to its 1-token
    pass; the draft gets the rest of the drafted round (at least 0)."""
    passes = [[1.0, 1.1, 1.2], [2.0, 2.5, 3.0]]  # seconds at 1 and 4 rows, w = 1, 2, 3 tokens per row
    verify, draft = calibrate(passes, undrafted=[1.5, 2.2], drafted=[3.0, 3.1])
    np.testing.assert_allclose(verify, [[1.5, 1.6, 1.7], [2.2, 2.7, 3.2]])
    np.testing.assert_allclose(draft, [1.3, 0.0])  # 4 rows: the drafted round is below the calibrated pass


def test_calibrated_prices_decide_as_the_rounds_cost():
    """One row, gamma 2: the calibrated table prices an undrafted round at its 1.5 s and a
    drafted one of full width at its 3.0 s, so drafting pays only above 2 expected tokens;
    the passes alone (0.3 s of draft) would draft above 1.5."""
    verify, draft = calibrate([[1.0, 1.1, 1.2]], undrafted=[1.5], drafted=[3.0])
    calibrated = PrefixScheduler((tuple(1 / verify[0]),), sps_rows=(1,), draft_seconds=tuple(draft))
    passes = PrefixScheduler(((1 / 1.0, 1 / 1.1, 1 / 1.2),), sps_rows=(1,), draft_seconds=(0.3,))
    logit = lambda p: jnp.full((1, 2), np.log(p / (1 - p)), jnp.float32)  # survival p, then p^2
    active = jnp.ones((1,), bool)
    # p = 0.9: 1 + 0.9 + 0.81 = 2.71 tokens in 3.0 s beats 1 in 1.5; p = 0.6: 1.96 tokens does not
    assert bool(speculation_pays(calibrated, logit(0.9), active))
    assert not bool(speculation_pays(calibrated, logit(0.6), active))
    assert bool(speculation_pays(passes, logit(0.6), active))  # 1.96 tokens in 1.5 s against 1 in 1.0


def test_timed_rounds_start_from_decoding_rows_every_time():
    """round_seconds runs each timing from `decoding_from`, applied to the state the previous
    programs left: every time the running rows are at the context, decode through the whole
    program and commit a token a round, and the free slot stays out. (Before, each reset added
    2^30 to max_new, which wrapped around int32 at the second reset and finished the rows in
    their first round, so the rounds timed were mostly idle.)"""
    target = tiny_target()
    engine = Engine(target, None, max_num_seqs=4, page_size=4, num_pages=7, num_scheduler_steps=2,
                    background_compile=False)
    running = np.arange(4) < 3
    table = np.zeros((4, 2), np.int32)  # rows 0-2: two pages each (context 5, then 2 rounds); slot 3 free
    table[:3] = 1 + np.arange(6).reshape(3, 2)
    state = engine.state
    for _ in range(4):
        state = decoding_from(state, running, 5)
        np.testing.assert_array_equal(state.target_cache.lengths, [5, 5, 5, 0])
        state, out, done, _ = engine_round(engine.target.model, None, None, engine.target.params, None, state, table,
                                           running, np.float32(1), np.zeros((0,), np.float32), 2, True)
        np.testing.assert_array_equal(done, [False, False, False, True])
        np.testing.assert_array_equal(np.asarray(out.count), [[1, 1, 1, 0]] * 2)  # [rounds, cap]
        np.testing.assert_array_equal(state.target_cache.lengths, [7, 7, 7, 0])


def test_serve_measures_and_caches_the_calibrated_table(tmp_path, monkeypatch):
    """serve.py without --sps: a table measured for the server's settings, calibrated to its
    rounds and cached; a restart with the same settings reads the cache. The table's undrafted
    price is the undrafted round as measured, and a drafted round of full width costs the
    drafted round as measured; on a CPU a drafted round costs more."""
    from dspark_jax.serving import cli, round_times

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    args = SimpleNamespace(sps=None, model="target", draft="draft", dtype="float32", max_num_seqs=1,
                           tensor_parallel=1, num_scheduler_steps=2, page_size=4, kernels="xla", scheduler="prefix")
    scheduler = cli.make_scheduler(args, tiny_target(), tiny_draft("dspark"), None)
    [path] = (tmp_path / "sps").iterdir()
    table = json.loads(path.read_text())
    assert scheduler.sps_rows == (1,) and table["concurrency"] == [1]
    assert scheduler.draft_seconds == tuple(table["draft_seconds"])
    (undrafted,), (drafted,) = table["round_seconds"]["undrafted"], table["round_seconds"]["drafted"]
    assert 0 < undrafted < drafted and len(table["sps"][0]) == 5
    np.testing.assert_allclose(1 / table["sps"][0][0], undrafted)
    np.testing.assert_allclose(1 / table["sps"][0][-1] + table["draft_seconds"][0], drafted)
    monkeypatch.setattr(round_times, "engine_table", lambda *a, **k: pytest.fail("measured again"))
    assert cli.make_scheduler(args, tiny_target(), tiny_draft("dspark"), None) == scheduler
