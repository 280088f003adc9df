"""Evaluation statistics on hand-made results, prompt files, and eval.py end to end."""

import json

import numpy as np
import pytest

from dspark_jax.data.conversations import Counts, DataError
from dspark_jax.evaluation.evaluation import acceptance_stats, json_ready, load_prompts
from dspark_jax.decoding.generate import GenerationResult


def test_acceptance_stats_by_hand():
    result = GenerationResult(
        tokens=[[1] * 9, [2] * 4, [3]],  # 8 and 3 tokens committed over rounds; the third had none
        verify_lengths=[[3, 3, 3], [3, 1], []],
        accepted_lengths=[[3, 0, 2], [2, 0], []],
        confidence_logits=[np.zeros((3, 3)), np.zeros((2, 3)), np.zeros((0, 3))],
    )
    s = acceptance_stats(result, gamma=3)
    assert s["rounds"] == 5 and s["generated_tokens"] == 14
    assert s["tau"] == pytest.approx(11 / 5)
    assert s["mean_verified"] == pytest.approx(13 / 5)
    assert s["verify_rate"] == pytest.approx(11 / (13 + 5))
    # slot 1: accepted in 3 of 5 offered rounds; slot 2: 3 of 4 offered; slot 3: 1 of 4
    np.testing.assert_allclose(s["accept_rate"], [3 / 5, 3 / 4, 1 / 4])
    np.testing.assert_allclose(s["conditional_acceptance"], [3 / 5, (3 / 4) / (3 / 5), (1 / 4) / (3 / 4)])


def test_load_prompts(tmp_path):
    path = tmp_path / "aime25.jsonl"
    path.write_text("\n".join(json.dumps({"turns": [f"question {i}", "follow-up"]}) for i in range(40)) + "\n")
    prompts = load_prompts(str(path))
    assert len(prompts) == 30 and len(set(prompts)) == 30  # the aime25 cap, after a seeded shuffle
    assert prompts == load_prompts(str(path))
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"text": "no turns"}\n{broken\n')
    counts = Counts()
    assert load_prompts(str(bad), counts=counts) == ["ok"]  # bad lines are skipped, counted and located
    assert counts.malformed == 2 and f"{bad}:2:" in counts.reasons[0] and f"{bad}:3: invalid JSON" in counts.reasons[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{broken\n\n")
    with pytest.raises(DataError, match=r"no prompts in .*empty.jsonl: skipped 1 of 1 lines; .*empty.jsonl:1: invalid JSON"):
        load_prompts(str(empty))


@pytest.mark.slow  # CI runs eval.py end to end through the README's command (tests/test_cli.py)
def test_eval_script_end_to_end(tmp_path, capsys):
    import eval as eval_script

    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny.jsonl").write_text("\n".join(json.dumps({"turns": [q]}) for q in
                                               ["What is 2 + 2?", "Name a color."]) + "\n")
    out = tmp_path / "r.json"
    sts = tmp_path / "sts"
    sts.mkdir()
    (sts / "sts.json").write_text(json.dumps({"temperatures": [1.0] * 7}))  # scaling by 1 changes nothing
    eval_script.main(["--draft", "random:dspark", "--data-dir", str(data), "--max-new-tokens", "8",
                      "--batch-size", "2", "--dtype", "float32", "--threshold-sweep", "0.5", "--sts", str(sts),
                      "--calibration-dir", str(tmp_path / "cal"), "--save-trace", str(tmp_path / "t.npz"),
                      "--out", str(out)])
    text = out.read_text()
    assert "NaN" not in text
    report = json.loads(text)
    entry = report["datasets"]["tiny"]
    s = entry["speculative"]
    assert entry["prompts"] == 2 and s["rounds"] >= 2 and s["tau"] >= 1.0
    assert all(0 <= a <= 1 for a in s["accept_rate"] if a == a)
    assert entry["autoregressive"]["tokens_per_s"] > 0 and entry["speedup"] > 0
    cal = entry["calibration"]
    assert len(cal["ece"]) == 7 and report["sts_temperatures"] == [1.0] * 7
    for metric in ("ece", "auroc", "brier"):
        np.testing.assert_array_equal(cal[metric], cal[f"{metric}_sts"])
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == ["tiny_reliability.png", "tiny_sts_reliability.png"]
    assert entry["threshold_sweep"][0]["threshold"] == 0.5
    assert "calibration per position, raw confidence: ECE" in capsys.readouterr().out
    from dspark_jax.evaluation.simulate import Trace

    trace = Trace.load(str(tmp_path / "t.npz"))
    assert trace.confidence.shape[1] == 7 and len(trace.accepted) == len(trace.confidence)


def test_json_ready_writes_null_for_nan():
    value = {"a": [1.0, float("nan")], "b": (float("inf"), "x"), "c": 2}
    assert json.dumps(json_ready(value), allow_nan=False) == '{"a": [1.0, null], "b": [null, "x"], "c": 2}'
