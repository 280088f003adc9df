"""serve.py on SmolLM2-135M-Instruct (fp32, autoregressive), tested live on 127.0.0.1 with the
official `openai` client: answers equal `generate`, streaming equals non-streaming, seeds,
stop strings, usage, every bad request's status and message (the server keeps answering),
the API key, /metrics, and a dropped stream freeing its pages."""

import asyncio

import httpx
import openai
import pytest

from dspark_jax import generate
from dspark_jax.evaluation.evaluation import chat_ids
from tests.serving.live import LiveServer

KEY = "test-key"
QUESTIONS = ["What is the capital of France?", "Name three colours."]
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server():
    srv = LiveServer("--dtype", "float32", "--max-num-seqs", "8", "--kv-memory", str(64 << 20),
                     "--max-model-len", str(MAX_MODEL_LEN), "--max-waiting", "24", "--api-key", KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def stream_text(chunks, chat=False):
    """(text, token ids, finish reason, usage) of a streamed answer with one choice."""
    text, ids, reason, usage = "", [], None, None
    for c in chunks:
        usage = c.usage or usage
        if not c.choices:
            continue
        choice = c.choices[0]
        text += (choice.delta.content or "") if chat else choice.text
        ids += getattr(choice, "token_ids", None) or []
        reason = choice.finish_reason or reason
    return text, ids, reason, usage


def test_chat_equals_generate(server, api, smollm2):
    prompts = chat_ids(smollm2.tokenizer, QUESTIONS)
    expected = generate(smollm2, None, prompts, max_new_tokens=24, temperature=0.0).tokens
    for question, prompt, want in zip(QUESTIONS, prompts, expected):
        answer = api.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_completion_tokens=24,
                                             messages=[{"role": "user", "content": question}],
                                             extra_body={"return_token_ids": True})
        choice = answer.choices[0]
        assert choice.token_ids == want
        assert choice.message.content == smollm2.tokenizer.decode(want, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if want[-1] in smollm2.config.eos_token_ids else "length")
        assert answer.prompt_token_ids == prompt
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(want))
        assert answer.usage.total_tokens == len(prompt) + len(want)
        streamed = api.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": question}], stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"return_token_ids": True})
        text, ids, reason, usage = stream_text(streamed, chat=True)
        assert (text, ids, reason) == (choice.message.content, want, choice.finish_reason)
        assert usage.completion_tokens == len(want)


def test_completions_prompt_forms_and_streaming(server, api, smollm2):
    tok = smollm2.tokenizer
    text = "The three primary colours are"
    ids = tok.encode(text)
    by_text = api.completions.create(model="SmolLM2-135M-Instruct", prompt=[text], max_tokens=16, temperature=0,
                                     extra_body={"return_token_ids": True})
    answer = api.completions.create(model="SmolLM2-135M-Instruct", prompt=[ids, ids], max_tokens=16, temperature=0,
                                    extra_body={"return_token_ids": True})
    first, second = sorted(answer.choices, key=lambda c: c.index)
    assert by_text.choices[0].prompt_token_ids == first.prompt_token_ids == ids  # a string and its ids: one prompt
    assert by_text.choices[0].text == first.text == second.text and len(first.token_ids) == 16
    assert first.text == tok.decode(first.token_ids, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == 2 * len(ids) and answer.usage.completion_tokens == 32
    streamed = api.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=16, temperature=0,
                                      stream=True)
    chunks = list(streamed)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3  # streamed in several pieces
    assert stream_text(chunks)[0] == first.text and chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_with_a_seed_are_reproducible(server, api):
    ask = lambda seed: api.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", n=3,
                                              max_tokens=12, temperature=1.0, seed=seed)
    texts = lambda a: [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    a, b, c = ask(11), ask(11), ask(12)
    assert texts(a) == texts(b)
    assert len(set(texts(a))) == 3 and not set(texts(a)) & set(texts(c))  # nearby seeds share no choice
    one = api.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12,
                                 temperature=1.0, seed=11)
    assert one.choices[0].text == texts(a)[0]  # the first choice uses the seed itself


def test_stop_strings(server, api):
    full = api.completions.create(model="SmolLM2-135M-Instruct", prompt="List the planets of the solar system:",
                                  max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle of the answer
    assert stop.strip(), full
    want = full[: full.index(stop)]
    for stream in (False, True):
        answer = api.completions.create(model="SmolLM2-135M-Instruct", prompt="List the planets of the solar system:",
                                        max_tokens=24, temperature=0, stop=["no such text", stop], stream=stream)
        if stream:
            chunks = list(answer)
            assert all(stop not in c.choices[0].text for c in chunks if c.choices)
            text, _, reason, _ = stream_text(chunks)
            stop_reason = chunks[-1].choices[0].stop_reason
        else:
            text, reason, stop_reason = answer.choices[0].text, answer.choices[0].finish_reason, \
                answer.choices[0].stop_reason
        assert (text, reason, stop_reason) == (want, "stop", stop)


BAD = [  # (request fields, status, what the message names)
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(temperature=-0.5), 400, "temperature"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(top_p=0.0), 400, "top_p"),
    (dict(top_p=1e-46), 400, "top_p"),  # > 0, but 0 in float32
    (dict(top_k=2**31), 400, "top_k"),
    (dict(prompt=""), 400, "prompt"),
    (dict(prompt=[1] * (MAX_MODEL_LEN + 10)), 400, "context"),
    (dict(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    (dict(prompt=[10**9]), 400, "token id"),
    (dict(stop=[""]), 400, "stop"),
    (dict(stop=[str(i) for i in range(17)]), 400, "stop"),
    (dict(n=0), 400, "n"),
    (dict(model="gpt-4"), 404, "gpt-4"),
    (dict(logprobs=2), 400, "logprobs"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),
]


@pytest.mark.parametrize("fields,status,named", BAD, ids=[f"{s}-{n}" for _, s, n in BAD])
def test_bad_requests_get_a_status_and_the_server_keeps_serving(server, fields, status, named):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4, **fields}
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert named in error["message"] and error["code"] == status
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, headers=headers,
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_malformed_bodies_and_keys(server, api):
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                       "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in api.models.list().data] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key, as /metrics


def test_a_full_queue_refuses_with_503(server):
    """The queue holds 24 requests and 8 run: most of a first request of n=20 waits in it, and
    a second of n=20 does not fit, so it gets 503 and none of its choices is queued."""
    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = lambda: {"prompt": "Count to ten:", "max_tokens": 4, "n": 20, "temperature": 1.0}
            first = asyncio.ensure_future(http.post(server.url + "/v1/completions", json=body()))
            while server.metrics()["dspark_num_requests_waiting"] < 10:
                await asyncio.sleep(0.05)
            second = await http.post(server.url + "/v1/completions", json=body())
            return await first, second

    first, second = asyncio.run(main())
    assert second.status_code == 503 and "queue is full" in second.json()["error"]["message"]
    assert first.status_code == 200 and len(first.json()["choices"]) == 20
    server.wait_idle()


def test_a_dropped_stream_frees_its_pages(server):
    body = {"prompt": "Write a long story about a dragon.", "max_tokens": 400, "temperature": 1.0,
            "ignore_eos": True, "stream": True}
    before = server.metrics()["dspark_request_success_total{finished_reason=length}"] \
        if "dspark_request_success_total{finished_reason=length}" in server.metrics() else 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert server.metrics()["dspark_kv_pages_used"] > 0
    assert any(line.startswith("data: ") for line in got)
    metrics = server.wait_idle(timeout_s=20)  # the closed connection aborted the request
    assert metrics.get("dspark_request_success_total{finished_reason=length}", 0) == before
    assert metrics["process_cpu_seconds_total"] > 0  # the HTTP process's own CPU time (bench_serving reads it)
