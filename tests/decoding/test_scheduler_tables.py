"""Schedulers over a serving engine's SPS table (one curve per row count) against float64
references: the table read for a round's rows, and Algorithm 1 and the drafting decision on
the curve of that many rows."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding.scheduler import (AsyncPrefixScheduler, PrefixScheduler, _rates, scheduler_from_table,
                                           speculation_pays)
from dspark_jax.evaluation.sps import load_table, profile_serving_sps
from tests.decoding.test_scheduler import algorithm1, pays


def rate64(sps, sps_rows, r, tokens):
    """Steps/s of `tokens` verify tokens over r rows, in float64: seconds linear in tokens per
    row (w = 1..W), then in the row count, flat outside the measured ones."""
    seconds = 1 / np.asarray(sps, np.float64)  # [C, W]
    w = np.clip(tokens / max(r, 1), 1, seconds.shape[1])
    per_count = [np.interp(w, np.arange(1, seconds.shape[1] + 1), s) for s in seconds]
    return 1 / np.interp(max(r, 1), sps_rows, per_count)


def random_table(rng, gamma):
    """Curves for a few row counts; seconds grow with the rows and the tokens per row."""
    rows = tuple(sorted(rng.choice(np.arange(1, 12), size=rng.integers(1, 4), replace=False).tolist()))
    seconds = np.cumsum(rng.uniform(0.01, 0.3, (len(rows), gamma + 1)), axis=1)
    seconds = np.cumsum(seconds, axis=0) + rng.uniform(0.5, 1.0)
    return tuple(tuple((1 / s).tolist()) for s in seconds), rows


def test_a_serving_table_is_read_for_the_rows_of_the_pass():
    rng = np.random.default_rng(0)
    for trial in range(40):
        gamma = int(rng.integers(1, 8))
        sps, rows = random_table(rng, gamma)
        sched = PrefixScheduler(sps, sps_rows=rows)
        r = int(rng.integers(0, 14))
        tokens = np.arange(1, max(r, 1) * (gamma + 1) + 3)
        ours = jax.jit(functools.partial(_rates, sched))(jnp.asarray(r), jnp.asarray(tokens))
        ref = [rate64(sps, rows, r, b) for b in tokens]
        np.testing.assert_allclose(ours, ref, rtol=2e-5, err_msg=str(trial))


def test_hand_read_values():
    """Two measured counts, 1 and 4 rows, w = 1..4: a pass of 4 tokens on one row is priced on
    the one-row curve (4 steps/s), not at the 4-row cost of the same B (5 steps/s for w = 1)."""
    sched = PrefixScheduler(((10.0, 8.0, 6.0, 4.0), (5.0, 4.0, 3.0, 2.0)), sps_rows=(1, 4))
    read = lambda r, b: float(_rates(sched, jnp.asarray(r), jnp.asarray(b)))
    assert read(1, 4) == pytest.approx(4.0) and read(4, 4) == pytest.approx(5.0)
    assert read(2, 4) == pytest.approx(1 / (2 / 3 * 0.125 + 1 / 3 * 0.25))  # w = 2, a third of the way to 4 rows
    assert read(8, 8) == pytest.approx(5.0) and read(4, 40) == pytest.approx(2.0)  # flat outside the table


# CI: the asynchronous scheduler (both read the table through one function, _rates)
@pytest.mark.parametrize("kind", [pytest.param("prefix", marks=pytest.mark.slow), "async"])
def test_scheduling_and_the_drafting_decision_use_the_curve_of_the_rounds_rows(kind):
    """On a serving table, Algorithm 1's lengths and `speculation_pays` equal the float64
    references run on the one curve SPS(B) of the round's active row count."""
    rng = np.random.default_rng(1)
    outcomes = []
    for trial in range(10):
        r, g = int(rng.integers(1, 9)), int(rng.integers(1, 8))
        sps, rows = random_table(rng, g)
        conf = rng.normal(0.5, 2.5, (r, g)).astype(np.float32)
        active = rng.uniform(size=r) < 0.85
        n = int(active.sum())
        curve = tuple(rate64(sps, rows, n, b) for b in range(1, max(n, 1) * (g + 1) + 1))
        draft_seconds = tuple(rng.uniform(0.0, 0.4, r).tolist())
        table = {"sps": sps, "sps_rows": rows, "draft_seconds": draft_seconds}
        sched = scheduler_from_table(kind, table)
        if kind == "prefix":
            lengths = jax.jit(sched)(jnp.asarray(conf), jnp.asarray(active))
            np.testing.assert_array_equal(lengths, algorithm1(conf, active, curve), err_msg=str(trial))
            older, state = None, None
        else:
            older = rng.normal(0.5, 2.5, (r, g)).astype(np.float32)
            state = (jnp.asarray(older), None)
        ours = bool(jax.jit(functools.partial(speculation_pays, sched))(jnp.asarray(conf), jnp.asarray(active), state))
        assert ours == pays(conf, active, curve, draft_seconds, older), trial
        outcomes.append(ours)
    assert 0.1 < np.mean(outcomes) < 0.9  # both answers occur


def test_profile_serving_sps_on_a_tiny_target(tmp_path):
    """One curve per concurrency, w = 1..gamma + 1; seconds never fall with more tokens per row
    or more rows; the saved table gives schedulers that read it by rows."""
    from tests.decoding.test_speculative import tiny_target

    table = profile_serving_sps(tiny_target(), 3, [2, 1, 2], context=16)
    assert table["sps_rows"] == [1, 2] and [len(c) for c in table["sps"]] == [4, 4]
    seconds = 1 / np.asarray(table["sps"])
    assert np.all(seconds > 0) and np.all(np.diff(seconds, axis=1) >= 0) and np.all(np.diff(seconds, axis=0) >= 0)
    (tmp_path / "serving.json").write_text(json.dumps({**table, "draft_seconds": [0.1, 0.2]}))
    sched = scheduler_from_table("async", load_table(str(tmp_path / "serving.json")))
    assert isinstance(sched, AsyncPrefixScheduler) and sched.sps_rows == (1, 2)
    assert sched.sps == tuple(tuple(c) for c in table["sps"])


def test_malformed_tables_name_the_key(tmp_path):
    bad = {"sps_rows": [1, 4], "sps": [[3.0, 2.0]]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json: sps_rows: .*one per curve of sps \(1 curves\)"):
        load_table(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="a list of curves needs sps_rows"):
        PrefixScheduler(((3.0, 2.0), (2.0, 1.0)))
    with pytest.raises(ValueError, match="all of the same length"):
        AsyncPrefixScheduler(((3.0, 2.0), (2.0,)), sps_rows=(1, 2))
    with pytest.raises(ValueError, match="sps_rows: expected increasing integer row counts"):
        PrefixScheduler(((3.0, 2.0), (2.0, 1.0)), sps_rows=(1, 2.5))
    with pytest.raises(ValueError, match="positive finite steps/s per row count"):
        PrefixScheduler(((3.0, 2.0), (2.0, float("inf"))), sps_rows=(1, 2))
    with pytest.raises(ValueError, match="non-empty list of positive finite steps/s"):
        PrefixScheduler((3.0, 0.0))
