"""serve.py decoding speculatively, tested live on 127.0.0.1 with the `openai` client.

The server runs a tiny random target (written as a transformers directory) with a random
DSpark draft in DeepSpec's format and the confidence scheduler (`--scheduler prefix` over
test_lossless's SPS table, so rows verify 1..4 tokens depending on confidence, with the draft
cost of its SERVING_GATED, so some rounds skip drafting), two decoding rounds per engine step
(`--num-scheduler-steps 2`):

- 64 concurrent clients each get exactly their offline greedy answer;
- answers sampled at T=1 through HTTP (8 requests of n=512 choices, seeded) follow the
  target's exact joint law of the first three tokens (chi-square at alpha 1e-3 against
  enumeration, as the engine's test_lossless does; the power is asserted below);
- the engine's compiled programs land in --compilation-cache;
- SIGTERM with streams in flight lets them finish, then the process exits (last test: it
  stops the module's server).
"""

import asyncio
import json
import signal

import httpx
import numpy as np
import openai
import pytest
from scipy import stats

from dspark_jax import generate
from dspark_jax.checkpoints.deepspec import save_draft
from dspark_jax.checkpoints.target import save_target
from tests.decoding.test_speculative import V, chi_square, joint, tiny_draft, tiny_target
from tests.serving.live import LiveServer
from tests.serving.test_lossless import SERVING_GATED, SERVING_SCHEDULER, SERVING_SPS

N_CLIENTS = 64
N_SAMPLES = 4096  # 8 requests of n=512
ALPHA = 1e-3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_target(tiny_target(), str(d / "target"))
    save_draft(tiny_draft("dspark"), str(d / "draft"))
    table = {"sps": list(SERVING_SPS), "draft_seconds": list(SERVING_GATED.draft_seconds)}
    (d / "sps.json").write_text(json.dumps(table))
    srv = LiveServer("--model", str(d / "target"), "--draft", str(d / "draft"), "--scheduler", "prefix",
                     "--sps", str(d / "sps.json"), "--dtype", "float32", "--max-num-seqs", "64", "--page-size", "4",
                     "--kv-memory", str(4 << 20), "--max-num-batched-tokens", "256", "--served-model-name", "tiny",
                     "--num-scheduler-steps", "2", "--compilation-cache", str(d / "xla"),
                     env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    srv.compilation_cache = d / "xla"
    yield srv
    srv.stop()


def client(server, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120, **kwargs)


def test_concurrent_clients_get_their_greedy_answers(server):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, int(rng.integers(1, 11))).tolist() for _ in range(N_CLIENTS)]
    expected = generate(tiny_target(), tiny_draft("dspark"), prompts, max_new_tokens=12, temperature=0.0,
                        scheduler=SERVING_SCHEDULER).tokens

    async def main():
        api = client(server)
        ask = lambda p: api.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0.0,
                                               extra_body={"return_token_ids": True})
        return await asyncio.wait_for(asyncio.gather(*(ask(p) for p in prompts)), 120)

    answers = asyncio.run(main())
    for prompt, answer, want in zip(prompts, answers, expected):
        choice = answer.choices[0]
        assert choice.token_ids == want, prompt
        assert choice.finish_reason == ("stop" if want[-1] == 7 else "length")
        assert choice.text == ""  # the tiny model has no tokenizer: token ids only
        assert answer.usage.completion_tokens == len(want) and answer.usage.prompt_tokens == len(prompt)
    metrics = server.wait_idle()
    assert metrics["dspark_draft_accepted_total{position=1}"] > 0 and metrics["dspark_tokens_per_round"] > 1
    assert metrics["dspark_engine_steps_total"] > 0 and metrics["dspark_engine_step_seconds_total"] > 0
    assert 0 < metrics["dspark_engine_wait_seconds_total"] < metrics["dspark_engine_step_seconds_total"]
    lengths = [metrics[f"dspark_verify_length_total{{length={b}}}"] for b in range(5)]
    assert sum(v > 0 for v in lengths[1:]) >= 2  # the scheduler chose varied lengths
    # the table's draft cost made it skip drafting in some rounds, not all
    assert 0 < metrics["dspark_undrafted_rounds_total"] < 0.9 * metrics["dspark_decode_rounds_total"], metrics
    # the engine measured how far this random draft's confidences over-forecast (it accepts far less than they say)
    assert 0 < metrics["dspark_draft_forecast_scale"] < 0.5, metrics


def test_compiled_programs_are_cached(server):
    """--compilation-cache: the engine's programs are written there (a restart loads them)."""
    openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120).completions.create(
        model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=0.0)  # this test alone runs programs too
    names = [p.name for p in server.compilation_cache.rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert any(n.startswith(("jit_engine_round", "jit_engine_prefill")) for n in names), names


def test_statistical_power():
    """At alpha 1e-3 and 4096 draws, a sampler off by a chi-square distance of 0.05 from the
    target's law is caught with probability > 0.99."""
    expected = joint(1.0, 1.0).reshape(-1) * N_SAMPLES
    dof = int((expected >= 5).sum())
    power = 1 - stats.ncx2.cdf(stats.chi2.ppf(1 - ALPHA, dof), dof, N_SAMPLES * 0.05)
    assert power > 0.99, power


def test_sampled_answers_follow_the_target_law(server):
    async def main():
        api = client(server)
        ask = lambda k: api.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=3, temperature=1.0, n=512,
                                               seed=512 * k, extra_body={"ignore_eos": True, "return_token_ids": True})
        return await asyncio.wait_for(asyncio.gather(*(ask(k) for k in range(N_SAMPLES // 512))), 300)

    answers = asyncio.run(main())
    tokens = np.asarray([c.token_ids for a in answers for c in a.choices])
    assert tokens.shape == (N_SAMPLES, 3)
    counts = np.bincount(tokens @ np.asarray([V * V, V, 1]), minlength=V**3)
    p_value, _ = chi_square(counts, joint(1.0, 1.0).reshape(-1) * N_SAMPLES)
    assert p_value > ALPHA, p_value
    assert len({tuple(t) for t in tokens}) > 50  # n choices are distinct samples, not copies


def test_sigterm_drains_streams_in_flight(server):
    """Runs last: it stops the module's server."""
    n, length = 16, 48

    async def stream(api, k, started, finished):
        got, reason = [], None
        response = await api.completions.create(model="tiny", prompt=[k % V, 1], max_tokens=length, temperature=1.0,
                                                seed=k, stream=True,
                                                extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in response:
            got += chunk.choices[0].token_ids
            reason = chunk.choices[0].finish_reason or reason
            started.add(k)
        finished.add(k)
        return got, reason

    async def main():
        api, started, finished = client(server), set(), set()
        tasks = [asyncio.ensure_future(stream(api, k, started, finished)) for k in range(n)]
        while len(started) < n:
            await asyncio.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        in_flight = n - len(finished)
        return in_flight, await asyncio.wait_for(asyncio.gather(*tasks), 120)

    in_flight, results = asyncio.run(main())
    assert in_flight > 0  # the signal came while streams were running
    assert all(len(got) == length and reason == "length" for got, reason in results)
    code = server.process.wait(60)
    assert code in (0, -signal.SIGTERM), server.output()
    assert "Traceback" not in server.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)
