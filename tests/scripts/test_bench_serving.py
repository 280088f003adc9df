"""scripts/bench_serving.py reads a server's counters from its /metrics: one the server does
not export is unknown (NaN), not zero."""

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import bench_serving  # noqa: E402
from benchlib import level_requests, step_profile  # noqa: E402


def read_counters(metrics: bytes):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=metrics))

    async def read():
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            return await bench_serving.counters(http)

    return asyncio.run(read())


def test_a_counter_the_server_does_not_export_is_nan_and_the_others_are_read():
    registry = CollectorRegistry()  # a server that counts steps but not the time they wait for the device
    Counter("dspark_engine_steps", "steps", registry=registry).inc(40)
    Counter("dspark_engine_step_seconds", "seconds", registry=registry).inc(0.2)
    Gauge("dspark_engine_compiles_pending", "compiling", registry=registry).set(2)
    values, pending = read_counters(generate_latest(registry))
    assert values["dspark_engine_steps_total"] == 40 and values["dspark_engine_step_seconds_total"] == 0.2
    assert pending == 2
    assert math.isnan(values["dspark_engine_wait_seconds_total"]) and math.isnan(values["dspark_decode_rounds_total"])
    profile = step_profile(values["dspark_engine_steps_total"], values["dspark_engine_step_seconds_total"], 0.4,
                           values["dspark_engine_wait_seconds_total"])
    assert profile["step_ms"] == pytest.approx(5.0) and profile["stepping"] == pytest.approx(0.5)
    assert math.isnan(profile["wait_ms"])


def test_a_server_without_any_of_them_has_nothing_compiling():
    values, pending = read_counters(b"")
    assert pending == 0 and all(math.isnan(values[name]) for name in bench_serving.COUNTERS)
    assert values["api_server_cpu"] == {}


def test_the_server_cpu_is_its_busiest_http_process():
    """One HTTP process: its process_cpu_seconds_total; several (serve.py --api-server-count):
    the largest change of dspark_api_server_cpu_seconds over the processes, by pid (one that
    appeared during the level counts from zero), and the changes' sum."""
    registry = CollectorRegistry()
    Counter("process_cpu_seconds", "cpu", registry=registry).inc(3.5)
    one, _ = read_counters(generate_latest(registry))
    assert bench_serving.server_cpu_seconds({**one, "process_cpu_seconds_total": 1.0}, one) == (2.5, 2.5)

    def several(values):
        registry = CollectorRegistry()
        gauge = Gauge("dspark_api_server_cpu_seconds", "cpu", ["pid"], registry=registry)
        for pid, value in values.items():
            gauge.labels(pid).set(value)
        return read_counters(generate_latest(registry))[0]

    before, after = several({"11": 5.0, "12": 1.0}), several({"11": 6.0, "12": 4.0, "13": 0.5})
    assert after["api_server_cpu"] == {"11": 6.0, "12": 4.0, "13": 0.5}
    assert bench_serving.server_cpu_seconds(before, after) == (3.0, 1.0 + 3.0 + 0.5)


def test_requests_per_level_come_once_for_every_level_or_once_per_level():
    default = lambda c: max(4 * c, 16)
    assert level_requests(None, [1, 16, 64], default) == [16, 64, 256]
    assert level_requests([32], [1, 16, 64], default) == [32, 32, 32]
    assert level_requests([64, 128, 512], [1, 16, 64], default) == [64, 128, 512]
    with pytest.raises(ValueError, match=r"one per level \(3\), got 2"):
        level_requests([64, 128], [1, 16, 64], default)
    with pytest.raises(ValueError, match="positive"):
        level_requests([0], [1], default)


def test_the_load_generator_refuses_counts_that_do_not_match_its_levels(capsys):
    with pytest.raises(SystemExit):
        bench_serving.main(["--concurrency", "1", "4", "--num-prompts", "8", "8", "8"])
    assert "one per level (2), got 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_serving.main(["--request-rate", "4", "--client-processes", "2"])
    assert "splits closed loops" in capsys.readouterr().err


def test_client_processes_share_the_slots_and_the_requests_in_proportion(monkeypatch):
    calls = []

    class Pool:  # runs each process's share here, in order
        pass

    async def run_here(pool, fn, *args):
        calls.append(args[2:])  # (slots, requests, first request)
        return [{}] * args[3], 0.5 * len(calls)

    loop = asyncio.new_event_loop()
    monkeypatch.setattr(loop, "run_in_executor", lambda pool, fn, *args: run_here(pool, fn, *args))
    args = type("Args", (), {"client_processes": 2})()
    results, cpu, processes = loop.run_until_complete(bench_serving.spread_closed_loop(Pool(), args, ["p"], 3, 10))
    loop.close()
    assert calls == [(1, 3, 0), (2, 7, 3)] and len(results) == 10 and cpu == 1.0  # the busiest process's CPU
    assert processes == 2


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on 127.0.0.1 in a thread, for the block; yields its base URL."""
    import portpicker
    import uvicorn

    port = portpicker.pick_unused_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_closed_loop_split_over_client_processes_sends_every_request_once(tmp_path):
    """bench_serving against the stand-in server (scripts/stream_stub.py, 5 chunks of 1 token per
    chat completion, recording each prompt): one process and two give the same requests, each
    sent once, and the clients' CPU time is counted."""
    from stream_stub import make_app

    seen = []
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(40)))
    with serving(make_app(chunks=5, tokens_per_chunk=1, interval_s=0.0, prompts=seen)) as url:
        for processes in ("1", "2"):
            seen.clear()
            out = tmp_path / f"out{processes}.json"
            bench_serving.main(["--base-url", url, "--model", "m", "--prompts", str(prompts),
                                "--concurrency", "3", "1", "--num-prompts", "10", "--warmup-passes", "1",
                                "--client-processes", processes, "--out", str(out)])
            rows = json.loads(out.read_text())["rows"]
            assert [r["client_processes"] for r in rows] == [int(processes), 1]  # concurrency 1: one process
            for row in rows:
                assert row["requests"] == 10 and row["tokens_per_s"] * row["seconds"] == pytest.approx(50)
                assert row["client_cpu"] > 0 and math.isnan(row["server_cpu"])
            assert sorted(seen) == sorted([f"prompt {i}" for i in range(10)] * 4)  # each level: a warm-up, a pass


@pytest.mark.parametrize("api_servers", [1, 2])
def test_serve_over_a_paced_engine_streams_every_token_and_counts_its_cpu(tmp_path, tiny_chat_target, api_servers):
    """stream_stub.py --api: serve.py (its engine process and HTTP processes) over PacedEngine (4
    tokens a step) streams each request its max_tokens of the engine's text, detokenized, with
    usage; bench_serving reads the HTTP process's CPU (the busiest one's) from /metrics."""
    import openai
    from stream_stub import TEXT
    from transformers import AutoTokenizer

    from tests.serving.live import LiveServer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    server = LiveServer("--api", "--tokenizer", tiny_chat_target, "--interval-ms", "1", "--api-server-count",
                        str(api_servers), script="scripts/stream_stub.py", startup_s=120)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        stream = client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10, stream=True, stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True})
        chunks = list(stream)
        ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {}).get("token_ids") or []]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text_ids = tokenizer.encode(TEXT, add_special_tokens=False)
        expected = [text_ids[i % len(text_ids)] for i in range(10)]
        assert ids == expected and text == tokenizer.decode(expected, skip_special_tokens=True)
        assert chunks[-1].usage.completion_tokens == 10 and chunks[-2].choices[0].finish_reason == "length"
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
        out = tmp_path / "out.json"
        bench_serving.main(["--base-url", server.url, "--prompts", str(prompts), "--concurrency", "4",
                            "--num-prompts", "8", "--max-tokens", "12", "--warmup-passes", "1", "--out", str(out)])
        row = json.loads(out.read_text())["rows"][0]
        assert row["requests"] == 8 and row["tokens_per_s"] * row["seconds"] == pytest.approx(8 * 12)
        assert 0 < row["server_cpu"] <= row["server_cpu_total"] < 2 * api_servers  # the busiest, and all
        cpu = [k for k in server.metrics() if k.startswith("dspark_api_server_cpu_seconds")]
        assert len(cpu) == (api_servers if api_servers > 1 else 0)
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM), server.output()  # uvicorn re-raises the signal it drained on


def test_the_engine_benchmark_refuses_a_level_given_twice_with_two_counts(capsys):
    import bench_engine

    with pytest.raises(SystemExit):
        bench_engine.main(["--modes", "ar", "--concurrency", "2", "2", "--num-prompts", "4", "8"])
    assert "given twice" in capsys.readouterr().err
