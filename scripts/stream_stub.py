"""A stand-in for an OpenAI-compatible server that streams chat completions at a fixed pace,
with no model behind it: what a load generator (bench_serving.py) achieves against it is the
load generator's own limit. Each request gets --chunks SSE chunks of --tokens-per-chunk tokens,
one every --interval-ms, then its usage and [DONE]; /metrics exports nothing.

    python scripts/stream_stub.py --port 8001 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8001 --model stub --concurrency 16 64 256 \\
        --num-prompts 128 256 1024 --client-processes 1
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--chunks", type=int, default=32, help="chunks a request (32 x 4 = 128 tokens)")
    p.add_argument("--tokens-per-chunk", type=int, default=4, help="as serve.py sends 4 rounds a step")
    p.add_argument("--interval-ms", type=float, default=5.0, help="between a request's chunks (an engine step)")
    args = p.parse_args(argv)
    uvicorn.run(make_app(args.chunks, args.tokens_per_chunk, args.interval_ms / 1e3), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
