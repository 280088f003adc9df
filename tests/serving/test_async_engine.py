"""AsyncEngine (and EngineProcess, the engine in a child process, with clients in other
processes) streams each request's tokens as rounds commit them, equal to `generate`'s
output, and a consumer that stops early aborts its request and frees its pages."""

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from multiprocessing.connection import Client

import pytest

from dspark_jax import generate
from dspark_jax.serving import AsyncEngine, Engine, EngineClient, EngineFull, EngineProcess, SamplingParams
from tests.decoding.test_speculative import SCHEDULER, tiny_draft, tiny_target

PROMPTS = [[1, 2, 3], [4, 5, 6, 1, 2, 0, 3], [3], [5, 5], [7, 1], [2, 2, 2], [0, 1, 0], [6, 6, 6, 6, 1, 2, 3, 4]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


def engine(**kwargs):
    return AsyncEngine(tiny_engine(**kwargs))


def tiny_engine(**kwargs):
    settings = dict(scheduler=SCHEDULER, max_num_seqs=4, page_size=4, num_pages=40, max_num_batched_tokens=8)
    return Engine(tiny_target(), tiny_draft("dspark"), **{**settings, **kwargs})


def build_in_child():
    """What EngineProcess runs in its child: (engine, tokenizer, model name)."""
    return tiny_engine(), None, "tiny"


def build_precompiling():
    eng = Engine(tiny_target(), None, max_num_seqs=1, page_size=4, num_pages=8, max_num_batched_tokens=8,
                 max_model_len=8)
    eng.precompile()  # in the background: the child is ready before these compile
    return eng, None, "tiny"


def build_that_fails():
    return tiny_engine(max_num_seqs=0), None, "tiny"


async def drain(stream) -> None:
    async for _ in stream:
        pass


async def collect(eng, prompt, params):
    deltas = [o async for o in eng.generate(prompt, params)]
    assert all(not o.finished for o in deltas[:-1]) and deltas[-1].finished
    return [t for o in deltas for t in o.new_token_ids], deltas


@pytest.mark.slow  # CI: the same streams through the engine process (below), serve.py's default
def test_concurrent_streams_equal_generate():
    ref = generate(tiny_target(), tiny_draft("dspark"), PROMPTS, max_new_tokens=20, temperature=0.0,
                   scheduler=SCHEDULER).tokens

    async def main():
        eng = engine()
        results = await asyncio.gather(*(collect(eng, p, GREEDY) for p in PROMPTS))
        stats = eng.stats()
        await eng.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    assert [tokens for tokens, _ in results] == ref
    assert any(len(deltas) > 2 for _, deltas in results)  # streamed over several steps
    assert stats.pages_used == 0 and stats.running == 0 and stats.waiting == 0


def test_deltas_queued_while_the_consumer_is_busy_come_as_one():
    async def main():
        eng = AsyncEngine(Engine(tiny_target(), None, max_num_seqs=4, page_size=4, num_pages=40,
                                 max_num_batched_tokens=8))
        rid = eng.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
        queued = lambda: sum(len(o.new_token_ids) for o in list(eng._queues[rid]._queue))  # delivered, unread
        while queued() < 5:  # the consumer is away for several steps
            await asyncio.sleep(0.01)
        deltas = [o async for o in eng.stream(rid)]
        await eng.shutdown()
        return deltas

    deltas = asyncio.run(main())
    assert len(deltas[0].new_token_ids) >= 5  # the first token and four rounds' tokens, in one delta
    assert all(not o.finished for o in deltas[:-1]) and deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert [t for o in deltas for t in o.new_token_ids] == generate(
        tiny_target(), None, [[1, 2, 3]], max_new_tokens=20, temperature=0.0, stop_ids=()).tokens[0]


def test_leaving_early_aborts_and_frees_pages():
    async def main():
        eng = engine()
        stream = eng.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        got = [await anext(stream) for _ in range(3)]
        assert eng.stats().pages_used > 0
        await stream.aclose()  # what a closed connection does
        other, _ = await collect(eng, [4, 5], GREEDY)  # the engine keeps serving
        stats = eng.stats()
        open_stream = eng.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        await anext(open_stream)
        await eng.shutdown()
        with pytest.raises(RuntimeError, match="the engine was shut down"):  # a stream open then ends
            await asyncio.wait_for(drain(open_stream), 30)
        with pytest.raises(RuntimeError, match="the engine was shut down"):  # and no request is taken
            eng.add_request([1], GREEDY)
        return got, other, stats

    got, other, stats = asyncio.run(main())
    assert all(not o.finished for o in got)
    assert other == generate(tiny_target(), None, [[4, 5]], max_new_tokens=20, temperature=0.0).tokens[0]
    assert stats.pages_used == 0 and stats.running == 0


def test_bad_requests_raise_before_streaming():
    async def main():
        eng = engine(max_waiting=1)
        with pytest.raises(ValueError, match="temperature"):
            await anext(eng.generate([1], SamplingParams(temperature=-1.0)))
        with pytest.raises(ValueError, match="prompt_ids is empty"):
            await anext(eng.generate([], GREEDY))
        first = eng.generate([1, 2], GREEDY)
        task = asyncio.ensure_future(collect_stream(first))
        await asyncio.sleep(0)  # first is queued
        with pytest.raises(EngineFull, match="queue is full"):
            await anext(eng.generate([3], GREEDY))
        tokens = await task
        await eng.shutdown()
        return tokens

    async def collect_stream(stream):
        return [t async for o in stream for t in o.new_token_ids]

    tokens = asyncio.run(main())
    ref = generate(tiny_target(), tiny_draft("dspark"), [[1, 2]], max_new_tokens=20, temperature=0.0).tokens[0]
    assert tokens == ref


def test_engine_process_streams_equal_generate_and_frees_aborted_pages():
    ref = generate(tiny_target(), tiny_draft("dspark"), PROMPTS, max_new_tokens=20, temperature=0.0,
                   scheduler=SCHEDULER).tokens

    async def main():
        eng = EngineProcess(build_in_child)
        assert (eng.model_name, eng.tokenizer, eng.limits) == ("tiny", None, tiny_engine().limits)
        with pytest.raises(ValueError, match="prompt_ids is empty"):  # checked here, before sending
            eng.add_request([], GREEDY)
        results = await asyncio.gather(*(collect(eng, p, GREEDY) for p in PROMPTS))
        stream = eng.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        got = [await anext(stream) for _ in range(2)]
        await stream.aclose()  # aborts it in the child
        for _ in range(200):  # the child reports its statistics after applying the abort
            if eng.stats().pages_used == 0:
                break
            await asyncio.sleep(0.05)
        stats = eng.stats()
        await eng.shutdown()
        return results, got, stats, eng._process.exitcode

    results, got, stats, exitcode = asyncio.run(main())
    assert [tokens for tokens, _ in results] == ref
    assert all(not o.finished for o in got) and sum(len(o.new_token_ids) for o in got) >= 2
    assert stats.pages_used == 0 and stats.running == 0 and stats.rounds > 0
    assert exitcode == 0  # "stop" ended it


def test_engine_process_statistics_follow_the_child_from_start_up():
    """A server reads the engine's statistics (its /metrics, which load generators wait on)
    before any request: after `start()` they follow the child's background compilations."""
    async def main():
        eng = EngineProcess(build_precompiling)
        at_ready = eng.stats()
        await eng.start()
        for _ in range(1200):
            if eng.stats().compiles_pending == 0:
                break
            await asyncio.sleep(0.1)
        stats = eng.stats()
        await eng.shutdown()
        return at_ready, stats

    at_ready, stats = asyncio.run(main())
    assert at_ready.compiles_pending > 0  # the child was ready before its programs compiled
    assert stats.compiles_pending == 0 and stats.program_shapes >= at_ready.compiles_pending
    assert stats.rounds == 0  # no request was needed


def test_engine_process_that_cannot_build_says_why():
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1"):
        EngineProcess(build_that_fails)


def test_engine_process_that_dies_fails_every_request_loudly():
    async def main():
        eng = EngineProcess(build_in_child)
        stream = eng.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        await anext(stream)
        eng._process.kill()  # what the out-of-memory killer would do
        with pytest.raises(RuntimeError, match="the engine failed: the engine process stopped unexpectedly"):
            await asyncio.wait_for(drain(stream), 60)
        assert eng.failed
        with pytest.raises(RuntimeError, match="the engine failed"):
            eng.add_request([1], GREEDY)
        await eng.shutdown()

    asyncio.run(main())


def test_a_parent_that_exits_without_shutdown_takes_the_child_with_it():
    """The child ignores SIGTERM (the parent drains on it first), so the parent kills it at
    exit rather than waiting for it forever."""
    code = ("from dspark_jax.serving import EngineProcess\n"
            "from tests.serving.test_async_engine import build_in_child\n"
            "e = EngineProcess(build_in_child)\n"
            "print('child pid', e._process.pid, flush=True)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr
    child = int(next(line for line in proc.stdout.splitlines() if line.startswith("child pid")).split()[-1])
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone (and reaped)


def raw_client(address: str, authkey: bytes, prompt: list[int], params: SamplingParams):
    """A client on the bare connection: sends one request ("raw-1") and reads every message until
    it finishes; returns the request ids of all outputs it was sent, and its tokens."""
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    assert conn.recv()[0] == "ready"
    conn.send(("add", "raw-1", prompt, params))
    seen, tokens = set(), []
    while True:
        message = conn.recv()
        if message[0] != "outputs":
            continue
        for output in message[1]:
            seen.add(output.request_id)
            if output.request_id == "raw-1":
                tokens += output.new_token_ids
                if output.finished:
                    conn.send(("stop",))
                    conn.close()
                    return seen, tokens


def malformed_client(address: str, authkey: bytes) -> bool:
    """A client on the bare connection that sends an "add" without its fields; True once the
    engine has dropped it (its connection closed), False if it has not within a minute."""
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    assert conn.recv()[0] == "ready"
    conn.send(("add", "bad-1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if conn.poll(1):
            try:
                conn.recv()  # (statistics may come first)
            except EOFError:
                return True
    return False


def test_clients_of_one_engine_process_get_their_own_outputs():
    """`EngineProcess(..., clients=True)`: clients connected from elsewhere (two fronts in one
    loop, and one on the bare connection) share the engine, each sent only its own requests'
    outputs; one that stops with a request in flight has it aborted at once (and its open
    stream raises), one that sends a malformed message is dropped while the engine goes on,
    a client with the wrong key is turned away, and the supervisor's handle takes no requests."""
    ref = generate(tiny_target(), tiny_draft("dspark"), PROMPTS, max_new_tokens=20, temperature=0.0,
                   scheduler=SCHEDULER).tokens

    async def main():
        supervisor = EngineProcess(build_in_child, clients=True)
        connect = lambda prefix, key=supervisor.authkey: EngineClient.connect(supervisor.address, key, prefix)
        with pytest.raises(multiprocessing.AuthenticationError):
            connect("intruder", b"not the key")
        a, b = connect("a"), connect("b")
        assert (a.model_name, a.tokenizer, a.limits) == ("tiny", None, tiny_engine().limits)
        with pytest.raises(RuntimeError, match="not from its supervisor's handle"):
            supervisor.add_request([1], GREEDY)
        half = len(PROMPTS) // 2
        raw = asyncio.to_thread(raw_client, supervisor.address, supervisor.authkey, PROMPTS[-1], GREEDY)
        results = await asyncio.wait_for(asyncio.gather(*(collect(a, p, GREEDY) for p in PROMPTS[:half]),
                                                        *(collect(b, p, GREEDY) for p in PROMPTS[half:]), raw), 120)
        long = SamplingParams(temperature=0.0, max_tokens=140, ignore_eos=True)  # would run for 140 tokens
        stream = b.generate([1, 2, 3], long)
        await anext(stream)
        before = b.stats().tokens
        await b.shutdown()  # with that request in flight: the engine aborts it
        with pytest.raises(RuntimeError, match="the engine client was shut down"):
            await asyncio.wait_for(drain(stream), 30)
        dropped = await asyncio.to_thread(malformed_client, supervisor.address, supervisor.authkey)
        for _ in range(200):
            if a.stats().pages_used == 0 and a.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        stats = a.stats()
        after = await collect(a, PROMPTS[0], GREEDY)  # the engine goes on serving the other client
        await a.shutdown()
        await supervisor.shutdown()
        return results, before, stats, after, dropped, supervisor.exitcode

    results, before, stats, after, dropped, exitcode = asyncio.run(main())
    *streamed, (seen, raw_tokens) = results
    assert [tokens for tokens, _ in streamed] == ref
    assert seen == {"raw-1"} and raw_tokens == ref[-1]  # no other client's outputs came to it
    assert stats.pages_used == 0 and stats.running == 0
    assert stats.tokens - before < 60  # stopped within a few rounds, not after its 140 tokens
    assert dropped and after[0] == ref[0]
    assert exitcode == 0
