"""The multi-device benchmark scripts run on the suite's 8 fake CPU devices and report what
they measure: bench_engine.py --tensor-parallel serves under a tensor mesh (and the same tokens
per request as one device, through the engine's own greedy equality tests), and
bench_scaling.py times data and fsdp meshes against one device."""

import json
import sys
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_engine  # noqa: E402
import bench_scaling  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / "qwen3_gqa_untied")


@pytest.mark.slow  # CI: the engine over tensor-parallel meshes in tests/serving/test_sharded.py
def test_bench_engine_runs_tensor_parallel(tmp_path, capsys):
    out = tmp_path / "engine.json"
    bench_engine.main(["--target", TINY, "--modes", "ar", "--tensor-parallel", "2", "--concurrency", "2",
                       "--max-tokens", "8", "--prompt-len", "16", "--static-batch", "2", "--kv-memory", "10000000",
                       "--dtype", "float32", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["tensor_parallel"] == 2 and results["static_tokens_per_s"] > 0
    [row] = results["rows"]
    assert row["concurrency"] == 2 and row["tokens"] == 16 * 8 and row["tokens_per_s"] > 0  # 16 requests of 8 tokens
    assert row["requests"] == 16 and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
    assert "x 2 (tensor parallel)" in capsys.readouterr().out


def test_bench_engine_names_a_mesh_too_large():
    with pytest.raises(SystemExit):
        bench_engine.main(["--target", TINY, "--modes", "ar", "--tensor-parallel", "16"])


@pytest.mark.slow
def test_bench_scaling_reports_each_mesh(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    bench_scaling.main(["--preset", "smollm2-135m", "--devices", "1", "2", "--axes", "data", "fsdp", "--modes",
                        "offline", "--seq", "64", "--anchors", "8", "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["axis"], r["devices"]) for r in rows] == [("data", 1), ("data", 2), ("fsdp", 1), ("fsdp", 2)]
    for r in rows:
        assert r["sequences_per_step"] == 2 * r["devices"] and r["ms_per_sequence"] > 0
        assert (r["efficiency"] is None) == (r["devices"] == 1)
    assert "| data | 2 | offline |" in capsys.readouterr().out


def test_bench_scaling_names_too_many_devices():
    with pytest.raises(SystemExit, match="--devices asks for 16 devices"):
        bench_scaling.main(["--devices", "16"])


@pytest.mark.slow  # CI runs the fixed verify length through generate (test_speculative), the same round program
def test_bench_engine_fixed_verify_lengths(tmp_path):
    """A fixed:<g> mode runs the draft verifying g tokens in every drafted round."""
    out = tmp_path / "engine.json"
    bench_engine.main(["--target", TINY, "--draft", "random:dspark", "--modes", "fixed:1", "--concurrency", "2",
                       "--max-tokens", "8", "--prompt-len", "16", "--static-batch", "0", "--kv-memory", "10000000",
                       "--dtype", "float32", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["mode"] == "fixed:1" and row["tokens"] == 16 * 8 and 1.0 <= row["tokens_per_round"] <= 2.0
    histogram = row["verify_length_histogram"]  # drafted rounds by draft tokens verified, 0..gamma
    assert len(histogram) == 8 and histogram[1] > 0 and sum(histogram) == histogram[1]
    with pytest.raises(SystemExit):
        bench_engine.main(["--target", TINY, "--modes", "fixed:0"])


@pytest.mark.slow  # CI runs the asynchronous scheduler through the engine's own tests
def test_bench_engine_async_scheduler_at_temperature(tmp_path):
    """The async mode serves every request with the asynchronous scheduler over the serving
    table it profiles (one curve for the one concurrency, w = 1..gamma + 1) and the draft's
    profiled cost, sampling at --temperature."""
    out = tmp_path / "engine.json"
    bench_engine.main(["--target", TINY, "--draft", "random:dspark", "--modes", "async", "--concurrency", "2",
                       "--max-tokens", "8", "--prompt-len", "16", "--static-batch", "0", "--kv-memory", "10000000",
                       "--temperature", "1.0", "--dtype", "float32", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["temperature"] == 1.0 and len(results["draft_seconds"]) == 2 and min(results["draft_seconds"]) > 0
    assert results["sps_rows"] == [2] and len(results["sps"]) == 1 and len(results["sps"][0]) == 8
    [row] = results["rows"]
    assert row["mode"] == "async" and row["tokens"] == 16 * 8 and 0.0 <= row["undrafted"] <= 1.0
    assert row["tokens_per_round"] >= 1.0


@pytest.mark.slow  # a benchmark's own bookkeeping; CI runs the engine it drives
def test_bench_engine_resumes_a_run_cut_short(tmp_path):
    """--resume keeps the rows an earlier run of the same command wrote and runs only the rest;
    another command's file, or one written on another kind of device, is refused."""
    out = tmp_path / "engine.json"
    argv = ["--target", TINY, "--draft", "random:dspark", "--modes", "ar", "fixed:1", "--concurrency", "2",
            "--max-tokens", "4", "--prompt-len", "8", "--num-prompts", "4", "--static-batch", "0", "--kv-memory",
            "10000000", "--dtype", "float32", "--out", str(out), "--resume"]
    bench_engine.main(argv)
    results = json.loads(out.read_text())
    assert [row["mode"] for row in results["rows"]] == ["ar", "fixed:1"]
    results["rows"] = results["rows"][:1]  # cut short after the first level
    results["rows"][0]["tokens_per_s"] = -1.0  # a mark that only a kept row carries
    out.write_text(json.dumps(results))
    bench_engine.main(argv)
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["ar", "fixed:1"] and rows[0]["tokens_per_s"] == -1.0
    assert rows[1]["tokens_per_s"] > 0 and rows[1]["tokens"] == 4 * 4
    with pytest.raises(SystemExit, match="written by another command"):
        bench_engine.main([a if a != "fixed:1" else "fixed:2" for a in argv])
    results = json.loads(out.read_text())
    out.write_text(json.dumps({**results, "device": "another GPU"}))
    with pytest.raises(SystemExit, match="measured on another GPU"):
        bench_engine.main(argv)


@pytest.mark.slow  # a benchmark's own bookkeeping; CI runs the engine it drives
def test_bench_engine_repeats_measure_the_engines_in_turn(tmp_path, capsys, monkeypatch):
    """--repeats 2 builds one engine per mode, each with half the KV budget, measures them in
    turn twice, and reports each repeat's tokens/s over AR's of the same repeat."""
    built = []

    class Recorded(bench_engine.Engine):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["kv_memory"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bench_engine, "Engine", Recorded)
    out = tmp_path / "engine.json"
    bench_engine.main(["--target", TINY, "--draft", "random:dspark", "--modes", "ar", "fixed:1", "--concurrency",
                       "2", "--max-tokens", "4", "--prompt-len", "8", "--num-prompts", "4", "--static-batch", "0",
                       "--kv-memory", "10000000", "--dtype", "float32", "--repeats", "2", "--out", str(out)])
    assert built == [5000000, 5000000]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mode"], row["repeat"]) for row in rows] == [("ar", 0), ("fixed:1", 0), ("ar", 1), ("fixed:1", 1)]
    assert all(row["tokens"] == 4 * 4 and row["concurrency"] == 2 for row in rows)
    ratios = [rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], rows[3]["tokens_per_s"] / rows[2]["tokens_per_s"]]
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| fixed:1 |") and x.count("|") == 10]
    assert line.endswith(f"| {ratios[0]:.3f} {ratios[1]:.3f} |")
    with pytest.raises(SystemExit):
        bench_engine.main(["--target", TINY, "--modes", "ar", "--repeats", "0", "--out", str(tmp_path / "no.json")])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow  # a benchmark's own bookkeeping; CI runs the engine it drives
def test_bench_engine_frees_each_engine_before_the_next_without_repeats(tmp_path, monkeypatch):
    """One engine at a time: the last one's KV pool is gone when the next one sizes its own
    (a fraction of the free memory then)."""
    alive_at_build, built = [], []

    class Recorded(bench_engine.Engine):
        def __init__(self, *args, **kwargs):
            alive_at_build.append([ref() is not None for ref in built])
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr(bench_engine, "Engine", Recorded)
    bench_engine.main(["--target", TINY, "--draft", "random:dspark", "--modes", "ar", "fixed:1", "--concurrency", "2",
                       "--max-tokens", "4", "--prompt-len", "8", "--num-prompts", "4", "--static-batch", "0",
                       "--kv-memory", "10000000", "--dtype", "float32", "--out", str(tmp_path / "engine.json")])
    assert alive_at_build == [[], [False]]
