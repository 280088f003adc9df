"""scripts/bench_serving.py reads a server's counters from its /metrics: one the server does
not export is unknown (NaN), not zero."""

import asyncio
import math
import os
import sys

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
    assert pending == 0 and all(math.isnan(v) for v in values.values())


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
