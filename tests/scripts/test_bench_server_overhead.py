"""scripts/bench_server_overhead.py on a tiny chat model: the in-process engine and serve.py
(with one HTTP process and with two) under the same closed-loop load, and the servers' ratios
computed from the runs."""

import json
import os
import sys

import portpicker
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import bench_server_overhead  # noqa: E402


@pytest.mark.slow  # about 50 s: two engines compile; CI tests the server itself live (tests/serving)
def test_engine_and_server_serve_the_same_load_and_the_ratios_are_theirs(tmp_path, tiny_chat_target):
    """One HTTP process and two, each against the same engine run."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Say {w}."]}) + "\n" for w in ("yes", "no", "maybe")))
    out = tmp_path / "overhead.json"
    bench_server_overhead.main(["--model", tiny_chat_target, "--prompts", str(prompts), "--concurrency", "1", "2",
                                "--max-tokens", "6", "--kv-memory", "50000000", "--dtype", "float32",
                                "--api-server-count", "1", "2", "--port", str(portpicker.pick_unused_port()),
                                "--out", str(out)])
    result = json.loads(out.read_text())
    engine = result["engine"]["rows"]
    assert sorted(result["servers"]) == ["1", "2"]
    for count, served in result["servers"].items():
        server = served["rows"]
        assert [r["concurrency"] for r in engine] == [r["concurrency"] for r in server] == [1, 2]
        for e, s in zip(engine, server):  # the same load: 16 requests a level, 6 tokens each (EOS ignored)
            assert e["requests"] == s["requests"] == 16 and e["tokens"] == 16 * 6
            assert s["tokens_per_s"] * s["seconds"] == pytest.approx(16 * 6)
            # the server's counters are read just outside the timed loop: a step more than it timed
            assert 0 < e["stepping"] <= 1 and 0 < s["stepping"] <= 1.1 and e["step_ms"] > 0 and s["step_ms"] > 0
            assert 0 < s["client_cpu"] < 2 and 0 < s["server_cpu"] < 2  # CPU seconds per second of the level
        rows = [r for r in result["rows"] if r["api_server_count"] == int(count)]
        for row, e, s in zip(rows, engine, server):
            assert row["throughput_ratio"] == pytest.approx(s["tokens_per_s"] / e["tokens_per_s"])
            assert row["tpot_ratio"] == pytest.approx(s["tpot_p50_ms"] / e["tpot_p50_ms"])


def test_a_table_without_a_draft_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_server_overhead.main(["--prompts", str(tmp_path / "p.jsonl"), "--sps", str(tmp_path / "table.json"),
                                    "--out", str(tmp_path / "out.json")])
    assert "--sps needs --draft" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
