"""Stand-in streaming servers with no model, to measure what surrounds the engine.

- By default, a minimal OpenAI-style app that streams chat completions at a fixed pace: what a
  load generator (bench_serving.py) achieves against it is the load generator's own limit.
  Each request gets --chunks SSE chunks of --tokens-per-chunk tokens, one every --interval-ms,
  then its usage and [DONE]; /metrics exports nothing.
- With --api, serve.py itself (`serving.cli.serve`: the engine process, its pipe, and
  --api-server-count HTTP processes with serve.py's app: validation, the chat template,
  detokenization, stop strings, SSE, metrics) over `PacedEngine`, an engine with no model
  that commits --tokens-per-chunk tokens to every running request at most once every
  --interval-ms, each request until its max_tokens: the HTTP layer's own cost per streamed
  token, in its /metrics' CPU seconds (bench_serving.py's `server_cpu`).

    python scripts/stream_stub.py --port 8001 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8001 --model stub --concurrency 16 64 256 \\
        --num-prompts 128 256 1024 --client-processes 1
    python scripts/stream_stub.py --port 8002 --api --tokenizer smollm2 [--api-server-count 2] &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8002 --concurrency 16 64 256 \\
        --num-prompts 128 256 1024 --client-processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from save_random_target import load_tokenizer

from dspark_jax.console import configure_logging
from dspark_jax.serving.cli import serve
from dspark_jax.serving.engine import EngineStats, RequestLimits
from dspark_jax.serving.params import RequestOutput, SamplingParams

# What PacedEngine's requests "generate", its token ids in a loop: ordinary English text, so
# that detokenizing it costs what an answer's does.
TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? In May she sold 48 / 2 = 24 clips, "
        "so altogether she sold 48 + 24 = 72 clips. ")


def make_app(chunks: int = 32, tokens_per_chunk: int = 4, interval_s: float = 0.005,
             prompts: list[str] | None = None) -> FastAPI:
    """The stub; each request's first user message is appended to `prompts` when one is given."""
    app = FastAPI()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return ""

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if prompts is not None:
            prompts.append(body["messages"][0]["content"])

        async def events():
            for _ in range(chunks):
                await asyncio.sleep(interval_s)
                delta = {"content": "w " * tokens_per_chunk}
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': chunks * tokens_per_chunk}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class PacedEngine:
    """An engine with no model, for serve.py's engine process to step: a step comes at most
    once every `interval_s` (it sleeps until then) and gives every running request the next
    `tokens_per_chunk` token ids of `TEXT`, as one `RequestOutput` each, until the request's
    max_tokens (stop token ids are not looked for: every request ends by length). Requests are
    checked as an engine checks them; an abort stops a request before the next step."""

    compiles_pending = 0
    num_queued = 0

    def __init__(self, tokenizer, tokens_per_chunk: int = 4, interval_s: float = 0.005, max_model_len: int = 8192):
        self.limits = RequestLimits(vocab_size=len(tokenizer), max_model_len=max_model_len, eos_ids=(),
                                    max_stop_ids=16, max_waiting=1 << 16, usable_pages=1 << 30, page_size=16, gamma=0)
        self.text_ids = list(tokenizer.encode(TEXT, add_special_tokens=False))
        self.tokens_per_chunk, self.interval_s = tokens_per_chunk, interval_s
        self._running: dict[str, list[int]] = {}  # request id -> [tokens sent, max_tokens]
        self._steps = self._tokens = 0
        self._last = 0.0  # when the last step committed (time.perf_counter)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=0, pages_used=0, pages_free=0, preemptions=0,
                           steps=self._steps, rounds=self._tokens, tokens=self._tokens, verify_length_histogram=[],
                           accepted_at_position=[], verified_at_position=[])

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str) -> None:
        self.limits.check(prompt, params)
        self._running[request_id] = [0, params.max_tokens]

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._running)

    def step(self) -> list[RequestOutput]:
        time.sleep(max(0.0, self._last + self.interval_s - time.perf_counter()))
        self._last = time.perf_counter()
        self._steps += 1
        outputs = []
        for rid, progress in list(self._running.items()):
            sent, most = progress
            new = [self.text_ids[i % len(self.text_ids)] for i in range(sent, min(sent + self.tokens_per_chunk, most))]
            progress[0] = sent + len(new)
            self._tokens += len(new)
            finished = progress[0] >= most
            if finished:
                del self._running[rid]
            outputs.append(RequestOutput(rid, new, finished, "length" if finished else None))
        return outputs

    def close(self) -> None:
        pass


def build_paced(tokenizer: str, tokens_per_chunk: int, interval_s: float):
    """What the engine process builds for --api: (PacedEngine, its tokenizer, model name "stub")."""
    loaded = load_tokenizer(tokenizer)
    return PacedEngine(loaded, tokens_per_chunk, interval_s), loaded, "stub"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--chunks", type=int, default=32, help="chunks a request (32 x 4 = 128 tokens)")
    p.add_argument("--tokens-per-chunk", type=int, default=4, help="as serve.py sends 4 rounds a step")
    p.add_argument("--interval-ms", type=float, default=5.0, help="between a request's chunks (an engine step)")
    p.add_argument("--api", action="store_true", help="serve.py over PacedEngine (the requests' max_tokens decide "
                                                      "their length, not --chunks)")
    p.add_argument("--tokenizer", default="smollm2", help="with --api: smollm2 (the setup's GGUF), a .gguf, or a "
                                                          "tokenizer dir")
    p.add_argument("--api-server-count", type=int, default=1, help="with --api: serve.py's HTTP processes")
    args = p.parse_args(argv)
    if args.api:
        configure_logging()
        return serve(functools.partial(build_paced, args.tokenizer, args.tokens_per_chunk, args.interval_ms / 1e3),
                     host=args.host, port=args.port, api_server_count=args.api_server_count)
    uvicorn.run(make_app(args.chunks, args.tokens_per_chunk, args.interval_ms / 1e3), host=args.host, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
