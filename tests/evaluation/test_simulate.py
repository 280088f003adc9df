"""Scheduler simulation and SPS tables."""

import json

import numpy as np
import pytest

from dspark_jax.decoding.generate import GenerationResult
from dspark_jax.evaluation.simulate import Trace, simulate, throughput, trace_from_result
from dspark_jax.evaluation import sps as sps_module
from dspark_jax.evaluation.sps import interpolate, profile_sps


def test_throughput_by_hand():
    # Request 0 verifies 2 tokens (1 accepted), request 1 verifies none (3 would have been).
    sps = [1.0, 0.5, 0.4, 0.3]
    assert throughput(np.asarray([[2, 0]]), np.asarray([[1, 3]]), sps) == pytest.approx((1 + 0 + 2) * 0.3)


def test_interpolate():
    assert interpolate({2: 10.0, 6: 2.0}, 7) == [10.0, 10.0, 8.0, 6.0, 4.0, 2.0, 2.0]
    # a rate measured below a larger B's (a slow first sample) is raised to it
    assert interpolate({1: 8.0, 2: 9.0, 4: 10.0, 8: 5.0}, 8) == [10.0, 10.0, 10.0, 10.0, 8.75, 7.5, 6.25, 5.0]



def test_draft_seconds_never_fall_with_more_rows(monkeypatch):
    """profile_draft_seconds interpolates in rows; a pass timed slower than one over more rows
    (a cold device) is lowered to it."""
    timed = {1: 3.0, 2: 1.0, 4: 2.0}  # seconds by row count, the first one slow
    monkeypatch.setattr(sps_module, "draft_seconds", lambda draft, batch, **kw: timed[batch])
    draft = type("Draft", (), {"config": type("Config", (), {"block_size": 3})()})()
    assert sps_module.profile_draft_seconds(draft, [1, 2, 4], context=16) == (1.0, 1.0, 1.5, 2.0)


def synthetic_trace(n, rng, gamma=6):
    """Calibrated confidences: the head reports the true conditional acceptance s_j."""
    s = rng.beta(5, 2, size=(n, gamma))
    accepted = np.sum(np.cumprod(rng.uniform(size=(n, gamma)) < s, axis=1), axis=1)
    return Trace(np.log(s / (1 - s)).astype(np.float32), accepted.astype(np.int32))


def test_simulated_scheduler_beats_no_speculation():
    trace = synthetic_trace(4096, np.random.default_rng(0))
    sps = [1.0 / (1 + 0.02 * b) for b in range(1, 2048)]  # step time grows with verify tokens
    for r in (1, 8, 64):
        out = simulate(trace, sps, r)
        assert out["fixed"][0] == out["no_speculation"] == pytest.approx(r * sps[r - 1])
        assert out["prefix"] > out["no_speculation"] and out["async"] > out["no_speculation"]
        assert out["prefix"] >= 0.97 * out["best_fixed"], out
    with pytest.raises(ValueError, match="simulate takes one curve SPS"):
        simulate(trace, [sps[:8], sps[:8]], 4)  # a serving table: its passes need the engine's row counts


def test_simulate_command_names_a_serving_table(tmp_path):
    from dspark_jax.__main__ import main

    synthetic_trace(64, np.random.default_rng(0)).save(str(tmp_path / "trace.npz"))
    (tmp_path / "serving.json").write_text(json.dumps({"sps_rows": [1, 4], "sps": [[3.0, 2.0], [2.0, 1.0]]}))
    with pytest.raises(ValueError, match=r"serving.json: sps: simulate takes one curve SPS\(B\)"):
        main(["simulate", "--trace", str(tmp_path / "trace.npz"), "--concurrency", "4",
              "--sps", str(tmp_path / "serving.json")])


def test_trace_from_result_needs_full_verification():
    conf = [np.zeros((3, 2), np.float32)]
    trace = trace_from_result(GenerationResult([[1] * 6], [[2, 2, 2]], [[1, 2, 0]], conf))
    np.testing.assert_array_equal(trace.accepted, [1, 2])
    with pytest.raises(ValueError, match="verified every draft token"):
        trace_from_result(GenerationResult([[1] * 6], [[2, 1, 2]], [[1, 0, 0]], conf))


def test_profile_sps_on_a_tiny_target():
    from tests.decoding.test_speculative import tiny_target

    table = profile_sps(tiny_target(), concurrency=2, context=16, gamma=3, steps=2, reps=2)
    assert sorted(map(int, table["measured"])) == [2, 4, 6, 8]
    assert len(table["sps"]) == 8 and all(v > 0 for v in table["sps"])


@pytest.mark.slow  # CI: profile_sps above and the draft's seconds in test_draft_seconds_never_fall_with_more_rows
def test_profile_sps_command_adds_the_drafts_seconds(tmp_path):
    """`python -m dspark_jax profile-sps --draft`: each concurrency's table also holds the draft's
    seconds per pass for 1..r rows, which `scheduler_from_spec` hands to the scheduler."""
    import json
    from pathlib import Path

    from dspark_jax.__main__ import main
    from dspark_jax.decoding.scheduler import scheduler_from_spec

    tiny = str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / "qwen3_gqa_untied")
    out = str(tmp_path / "sps_r{concurrency}.json")
    assert main(["profile-sps", "--model", tiny, "--draft", "random:dspark", "--concurrency", "2", "--context", "16",
                 "--gamma", "3", "--dtype", "float32", "--out", out]) in (0, None)
    table = json.loads((tmp_path / "sps_r2.json").read_text())
    assert len(table["sps"]) == 8 and len(table["draft_seconds"]) == 2 and min(table["draft_seconds"]) > 0
    assert scheduler_from_spec(f"prefix:{tmp_path / 'sps_r2.json'}").draft_seconds == tuple(table["draft_seconds"])
