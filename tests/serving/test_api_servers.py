"""serve.py --api-server-count 2, tested live on 127.0.0.1 with the `openai` client: two HTTP
processes share the port and one engine process (a tiny random target, decoding
autoregressively in float32).

- 32 concurrent clients each get exactly their offline greedy answer, whichever process
  serves them (in rounds, until both processes have served);
- /metrics, from either process, adds up both processes' request counts and shows each
  process's CPU seconds (and drops the CPU series of one that exited);
- the API key holds in both processes;
- an HTTP process that cannot reach the engine says why and exits with uvicorn's start-up
  failure code (uvicorn then stops them all, and serve.py exits with 1);
- an engine process that dies stops the server, which exits with 1 (with one HTTP process or
  two);
- SIGTERM with streams in flight lets them finish, then every process exits (last test).
"""

import asyncio
import json
import os
import signal
import subprocess

import httpx
import numpy as np
import openai
import pytest

from dspark_jax import generate
from dspark_jax.checkpoints.target import save_target
from dspark_jax.serving.cli import API_SERVER_ENV, api_server_app
from dspark_jax.serving.metrics import forget_exited_processes
from tests.decoding.test_speculative import V, tiny_target
from tests.serving.live import LiveServer

KEY = "two-servers"
N_CLIENTS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_target(tiny_target(), str(d / "target"))
    srv = LiveServer("--model", str(d / "target"), "--api-server-count", "2", "--dtype", "float32",
                     "--max-num-seqs", "32", "--page-size", "4", "--kv-memory", str(4 << 20),
                     "--max-num-batched-tokens", "128", "--served-model-name", "tiny", "--api-key", KEY)
    yield srv
    srv.stop()


def stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def spawned_children(pid: int) -> list[int]:
    """The processes `pid` started with multiprocessing's spawn (the HTTP processes and the
    engine's; not its resource tracker, which outlives it by a moment)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = stat(entry)
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except OSError:
            continue
        if fields is not None and int(fields[1]) == pid and spawned:
            found.append(int(entry))
    return found


def client(server, key=KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_concurrent_clients_get_their_greedy_answers_and_metrics_add_up(server):
    """Rounds of 32 concurrent requests (new connections each round; which process accepts one is
    the kernel's choice) until both processes have served some; then every scrape, from either
    process, counts every request of every round."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, V, int(rng.integers(1, 11))).tolist() for _ in range(N_CLIENTS)]
    expected = generate(tiny_target(), None, prompts, max_new_tokens=12, temperature=0.0).tokens

    async def round_of_requests():
        apis = [client(server) for _ in range(4)]  # several connection pools
        ask = lambda k, p: apis[k % 4].completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0.0,
                                                          extra_body={"return_token_ids": True})
        return await asyncio.wait_for(asyncio.gather(*(ask(k, p) for k, p in enumerate(prompts))), 120)

    served = lambda m: [v for k, v in m.items() if k.startswith("dspark_api_server_cpu_seconds")]
    for rounds in range(1, 6):
        answers = asyncio.run(round_of_requests())
        for prompt, answer, want in zip(prompts, answers, expected):
            assert answer.choices[0].token_ids == want, prompt
            assert answer.usage.completion_tokens == len(want) and answer.usage.prompt_tokens == len(prompt)
        cpu = served(server.wait_idle())
        assert len(cpu) == 2, cpu
        if all(v > 0 for v in cpu):  # set as a process's requests end: both have served
            break
    assert all(v > 0 for v in cpu), f"one process served none of {rounds} rounds"
    for m in [server.wait_idle() for _ in range(8)]:  # a new connection each: either process answers
        finished = sum(v for k, v in m.items() if k.startswith("dspark_request_success_total"))
        assert finished == rounds * N_CLIENTS, m
        assert m["dspark_generation_tokens_total"] == rounds * sum(map(len, expected))
        assert m["dspark_prompt_tokens_total"] == rounds * sum(map(len, prompts))
        assert m["dspark_time_to_first_token_seconds_count"] == rounds * N_CLIENTS
        assert m["dspark_decode_rounds_total"] > 0  # the engine's own counters come along


def test_the_api_key_holds_in_every_process(server):
    async def main():
        denied = 0
        for _ in range(8):
            try:
                await client(server, key="wrong").models.list()
            except openai.AuthenticationError:
                denied += 1
        return denied, (await client(server).models.list()).data[0].id

    assert asyncio.run(main()) == (8, "tiny")


def test_an_http_process_that_cannot_reach_the_engine_says_why_and_stops_the_others(tmp_path, monkeypatch):
    from uvicorn.config import STARTUP_FAILURE

    monkeypatch.setenv(API_SERVER_ENV, json.dumps({"address": str(tmp_path / "no-engine"), "authkey": "00",
                                                   "api_key": None, "shared": str(tmp_path)}))
    with pytest.raises(SystemExit) as exit_:
        api_server_app()
    assert exit_.value.code == STARTUP_FAILURE
    (reason,) = tmp_path.glob("failed-*")
    assert "could not connect to the engine process" in reason.read_text() and "no-engine" in reason.read_text()


@pytest.mark.parametrize("count", [1, 2])
def test_a_server_whose_engine_process_dies_fails_its_requests_then_exits_1(tmp_path, count):
    """A streamed and a non-streamed request (n=2) are in flight when the engine process is
    killed: the stream ends with an error event, the other gets a 500 naming the failure, and
    serve.py stops and exits with 1."""
    save_target(tiny_target(), str(tmp_path / "target"))
    srv = LiveServer("--model", str(tmp_path / "target"), "--api-server-count", str(count), "--dtype", "float32",
                     "--max-num-seqs", "4", "--page-size", "4", "--kv-memory", str(1 << 20),
                     "--served-model-name", "tiny")
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 250, "temperature": 0.0, "ignore_eos": True}

    async def running(http) -> float:
        text = (await http.get("/metrics")).text
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("dspark_num_requests_running "))

    async def main(engine: int):
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            whole = asyncio.ensure_future(http.post("/v1/completions", json={**body, "n": 2}))
            while await running(http) < 2:  # both its choices in the engine
                await asyncio.sleep(0.01)
            events = []
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 1:
                            os.kill(engine, signal.SIGKILL)  # mid-stream: what the out-of-memory killer does
            return events, await whole

    try:
        http = {srv.process.pid} if count == 1 else {
            int(k.split("pid=")[1].rstrip("}")) for k in srv.metrics() if k.startswith("dspark_api_server_cpu_seconds")}
        (engine,) = set(spawned_children(srv.process.pid)) - http
        events, whole = asyncio.run(main(engine))
        code = srv.process.wait(60)
    finally:
        srv.stop()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "the engine failed" in error["message"]
    assert whole.status_code == 500 and "the engine failed" in whole.json()["error"]["message"]
    assert code == 1, srv.output()
    assert ("the engine failed" if count == 1 else "the engine process ended while serving") in srv.output()


def test_the_cpu_series_of_an_exited_process_is_dropped(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its pid names no process
    for pid in (gone.pid, os.getpid()):
        (tmp_path / f"gauge_liveall_{pid}.db").write_bytes(b"")
    (tmp_path / f"counter_{gone.pid}.db").write_bytes(b"")  # its counts stay in the sums
    forget_exited_processes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"counter_{gone.pid}.db",
                                                                 f"gauge_liveall_{os.getpid()}.db"])


def test_sigterm_drains_streams_in_flight_then_every_process_exits(server):
    """Runs last: it stops the module's server."""
    n, length = 16, 48

    async def stream(api, k, started, finished):
        got = []
        response = await api.completions.create(model="tiny", prompt=[k % V, 1], max_tokens=length, temperature=0.0,
                                                stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in response:
            got += chunk.choices[0].token_ids
            started.add(k)
        finished.add(k)
        return got

    async def main():
        apis, started, finished = [client(server) for _ in range(4)], set(), set()
        tasks = [asyncio.ensure_future(stream(apis[k % 4], k, started, finished)) for k in range(n)]
        while len(started) < n:
            await asyncio.sleep(0.01)
        kids = spawned_children(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        in_flight = n - len(finished)
        return in_flight, kids, await asyncio.wait_for(asyncio.gather(*tasks), 120)

    in_flight, kids, results = asyncio.run(main())
    assert in_flight > 0  # the signal came while streams were running
    expected = generate(tiny_target(), None, [[k % V, 1] for k in range(n)], max_new_tokens=length,
                        temperature=0.0, stop_ids=[]).tokens
    assert results == expected
    code = server.process.wait(60)
    assert code == 0, server.output()
    assert "Traceback" not in server.output()
    assert len(kids) == 3  # two HTTP processes and the engine's
    assert all(stat(pid) is None or stat(pid)[0] == "Z" for pid in kids)  # gone (or exited, unreaped)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)
