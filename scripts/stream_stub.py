"""Stand-in streaming servers with no model, to measure what surrounds the engine.

- By default, a minimal OpenAI-style app that streams chat completions at a fixed pace: what a
  load generator (bench_serving.py) achieves against it is the load generator's own limit.
  Each request gets --chunks SSE chunks of --tokens-per-chunk tokens, one every --interval-ms,
  then its usage and [DONE]; /metrics exports nothing.
- With --api, serve.py's own app (`build_app`: validation, the chat template, detokenization,
  stop strings, SSE, metrics) over `PacedEngine`, an engine that commits --tokens-per-chunk
  tokens for every running request at most once every --interval-ms, each request until its
  max_tokens: the HTTP layer's own cost per streamed token, in its /metrics'
  process_cpu_seconds_total (bench_serving.py's `server_cpu`). The outputs reach the event loop
  directly, not through the engine process's pipe and threads, so serve.py's own HTTP process
  costs somewhat more: a lower bound.

    python scripts/stream_stub.py --port 8001 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8001 --model stub --concurrency 16 64 256 \\
        --num-prompts 128 256 1024 --client-processes 1
    python scripts/stream_stub.py --port 8002 --api --tokenizer smollm2 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8002 --concurrency 16 64 256 \\
        --num-prompts 128 256 1024 --client-processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from save_random_target import load_tokenizer

from dspark_jax.serving.async_engine import _Front
from dspark_jax.serving.engine import EngineStats, RequestLimits
from dspark_jax.serving.openai_server import build_app
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


class PacedEngine(_Front):
    """An engine front (what serve.py's app drives) with no model: one "step" at most every
    `interval_s` (it sleeps, then commits) gives every running request the next
    `tokens_per_chunk` token ids of `TEXT`, as one `RequestOutput` each, until the request's
    max_tokens (stop token ids are not looked for: every request ends by length). Requests are
    checked as an engine checks them; aborts stop a request before the next step."""

    def __init__(self, tokenizer, tokens_per_chunk: int = 4, interval_s: float = 0.005, max_model_len: int = 8192):
        super().__init__()
        self.limits = RequestLimits(vocab_size=len(tokenizer), max_model_len=max_model_len, eos_ids=(),
                                    max_stop_ids=16, max_waiting=1 << 16, usable_pages=1 << 30, page_size=16, gamma=0)
        self.text_ids = list(tokenizer.encode(TEXT, add_special_tokens=False))
        self.tokens_per_chunk, self.interval_s = tokens_per_chunk, interval_s
        self._running: dict[str, list[int]] = {}  # request id -> [tokens sent, max_tokens]
        self._steps = self._tokens = 0
        self._task: asyncio.Task | None = None

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=0, pages_used=0, pages_free=0, preemptions=0,
                           steps=self._steps, rounds=self._tokens, tokens=self._tokens, verify_length_histogram=[],
                           accepted_at_position=[], verified_at_position=[])

    def _queued(self) -> int:
        return 0

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self._running[rid] = [0, params.max_tokens]
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _cancel(self, rid: str) -> None:
        self._running.pop(rid, None)

    async def _run(self) -> None:
        while self._running:
            await asyncio.sleep(self.interval_s)
            self._steps += 1
            for rid, progress in list(self._running.items()):
                sent, most = progress
                new = [self.text_ids[i % len(self.text_ids)] for i in range(sent, min(sent + self.tokens_per_chunk,
                                                                                       most))]
                progress[0] = sent + len(new)
                self._tokens += len(new)
                finished = progress[0] >= most
                if finished:
                    del self._running[rid]
                self._deliver(rid, RequestOutput(rid, new, finished, "length" if finished else None))

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--chunks", type=int, default=32, help="chunks a request (32 x 4 = 128 tokens)")
    p.add_argument("--tokens-per-chunk", type=int, default=4, help="as serve.py sends 4 rounds a step")
    p.add_argument("--interval-ms", type=float, default=5.0, help="between a request's chunks (an engine step)")
    p.add_argument("--api", action="store_true", help="serve.py's app over PacedEngine (the requests' max_tokens "
                                                      "decide their length, not --chunks)")
    p.add_argument("--tokenizer", default="smollm2", help="with --api: smollm2 (the setup's GGUF), a .gguf, or a "
                                                          "tokenizer dir")
    args = p.parse_args(argv)
    if args.api:
        tokenizer = load_tokenizer(args.tokenizer)
        app = build_app(PacedEngine(tokenizer, args.tokens_per_chunk, args.interval_ms / 1e3), tokenizer, "stub")
    else:
        app = make_app(args.chunks, args.tokens_per_chunk, args.interval_ms / 1e3)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
