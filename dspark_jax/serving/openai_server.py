"""The OpenAI-compatible HTTP API over an `AsyncEngine`: a FastAPI app (`build_app`).

FastAPI + pydantic validate requests and give their errors a field path, uvicorn (in
`serving.cli`) runs the app and its graceful shutdown, prometheus_client renders /metrics:
the libraries vLLM and SGLang serve with. The server-sent-events framing of streamed answers
(`data: <json>` blocks, then `data: [DONE]`) is two lines and written here.

Every choice of a request is one engine request. With a seed, the first choice of each prompt
uses the seed itself (as the engine would) and choice i > 0 a seed hashed from (seed, i), so a
seeded request is reproducible, its choices differ, and requests with nearby seeds do not
share choices. A choice's tokens go through a
`TextStream` (incremental detokenization, stop strings); a stop string ends the choice and
aborts its engine request. A client that disconnects, streaming or not, aborts its engine
requests, which frees their pages at once.

Errors have OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for invalid
parameters or a prompt that does not fit the context, 401 for a missing or wrong API key,
404 for another model name, 503 when the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from typing import Callable

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from dspark_jax.serving.async_engine import AsyncEngine, EngineClient
from dspark_jax.serving.engine import EngineFull
from dspark_jax.serving.metrics import ServerMetrics
from dspark_jax.serving.params import RequestOutput, SamplingParams
from dspark_jax.serving.protocol import ChatCompletionRequest, CompletionRequest
from dspark_jax.serving.text import TextStream


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclasses.dataclass(eq=False)
class Choice:
    """One generated answer: its engine request, text and tokens so far, and timings."""

    index: int
    prompt: list[int]
    params: SamplingParams
    text: TextStream
    request_id: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival: float = 0.0
    first: float | None = None

    def take(self, out: RequestOutput) -> tuple[str, list[int]]:
        """The text and token ids `out` adds to this choice (cut at a stop string, which ends it)."""
        taken = len(self.text.token_ids)
        text = self.text.extend(out.new_token_ids)
        ids = self.text.token_ids[taken:]
        if self.text.stopped:
            self.finish_reason, self.stop_reason = "stop", self.text.stop_reason
            return text, ids
        if out.finished:
            text += self.text.finish()
            self.finish_reason = out.finish_reason
            last = self.text.token_ids[-1] if self.text.token_ids else None
            if out.finish_reason == "stop" and last in self.params.stop_token_ids:
                self.stop_reason = last
        return text, ids

    @property
    def token_ids(self) -> list[int]:
        return self.text.token_ids


def build_app(engine: AsyncEngine | EngineClient, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving `engine` under `model_name`; `tokenizer` (None: token-id prompts only,
    answers as token ids with empty text) turns text into ids and back; with `api_key`, every
    /v1 route wants `Authorization: Bearer <api_key>`."""
    metrics = ServerMetrics(engine.stats)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="dspark_jax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return error_response(e.status, e.message, e.param, e.kind, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        problems, param = [], None
        for err in e.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')} "
                                f"at character {err['loc'][-1]})")
                continue
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or ".".join(loc) or None
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return error_response(400, "; ".join(problems), param)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), kind="not_found_error" if e.status_code == 404 else
                              "invalid_request_error")

    async def require_key(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           kind="authentication_error")

    @app.get("/health")
    async def health():
        if engine.failed:
            return error_response(503, f"the engine failed ({engine.failure}); the server is stopping",
                                  kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dspark_jax", "max_model_len": engine.limits.max_model_len}]}

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_request(body)
        prompts = [encode(tokenizer, p) for p in body.prompts()]
        return await serve(body, prompts, request, chat=False)

    @api.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_request(body)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send token ids to /v1/completions", "messages")
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        except Exception as e:  # the template's own complaint (roles out of order, no template)
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from e
        return await serve(body, [list(prompt)], request, chat=True)

    app.include_router(api)

    async def serve(body, prompts: list[list[int]], request: Request, chat: bool):
        choices = submit(body, prompts)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        usage = lambda: {"prompt_tokens": sum(map(len, prompts)),
                         "completion_tokens": sum(len(c.token_ids) for c in choices),
                         "total_tokens": sum(map(len, prompts)) + sum(len(c.token_ids) for c in choices)}
        if body.stream:
            events = stream_choices(choices, request)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(events, head, kind, chat, body, usage, include_usage),
                                     media_type="text/event-stream")
        await collect(choices, request)
        out = []
        for c in choices:
            item = {"index": c.index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "logprobs": None}
            item.update({"message": {"role": "assistant", "content": c.text.text}} if chat else {"text": c.text.text})
            if body.return_token_ids:
                item["token_ids"] = c.token_ids
                if not chat:
                    item["prompt_token_ids"] = c.prompt
            out.append(item)
        response = {**head, "object": kind, "choices": out, "usage": usage()}
        if chat and body.return_token_ids:
            response["prompt_token_ids"] = prompts[0]
        return response

    def check_request(body) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{model_name}`",
                           "model", "not_found_error")
        unsupported = body.unsupported_fields()
        if unsupported:
            raise APIError(400, f"{unsupported[0]} is not supported by this server", unsupported[0])
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if body.stop and tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer, and this model has none", "stop")

    def submit(body, prompts: list[list[int]]) -> list[Choice]:
        """Queues every choice in the engine, or none (a bad prompt or a full queue)."""
        total = body.n * len(prompts)
        if total > engine.limits.max_waiting:
            raise APIError(400, f"n times the number of prompts is {total}; this server queues at most "
                                f"{engine.limits.max_waiting} requests", "n")
        choices = []
        for p, prompt in enumerate(prompts):
            budget = engine.limits.max_tokens_for(len(prompt))
            if body.token_budget is not None and budget >= 1 and body.token_budget > budget:
                raise APIError(400, f"prompt ({len(prompt)} tokens) plus max_tokens ({body.token_budget}) exceed the "
                                    f"{len(prompt) + budget} tokens this server holds for a request", "max_tokens")
            for i in range(body.n):
                index = p * body.n + i
                try:
                    params = SamplingParams(
                        temperature=body.temperature, top_p=body.top_p, top_k=0 if body.top_k == -1 else body.top_k,
                        seed=None if body.seed is None else choice_seed(body.seed, i),
                        max_tokens=max(budget, 1) if body.token_budget is None else body.token_budget,
                        stop_token_ids=body.stop_token_ids,
                        ignore_eos=body.ignore_eos)
                except ValueError as e:
                    raise APIError(400, str(e), str(e).split(" ")[0]) from e
                choices.append(Choice(index, prompt, params, TextStream(tokenizer, body.stop or ())))
        submitted = []
        try:
            for c in choices:
                c.arrival = time.perf_counter()
                c.request_id = engine.add_request(c.prompt, c.params)
                submitted.append(c)
        except ValueError as e:
            abort(submitted)
            raise APIError(400, str(e), "messages" if isinstance(body, ChatCompletionRequest) else "prompt") from e
        except EngineFull as e:
            abort(submitted)
            raise APIError(503, str(e), kind="server_overloaded") from e
        except RuntimeError as e:  # the engine failed: the server is stopping (/health says so)
            abort(submitted)
            raise APIError(503, str(e), kind="server_error") from e
        return choices

    def abort(choices: list[Choice]) -> None:
        for c in choices:
            engine.abort(c.request_id)

    async def run_choice(c: Choice, emit: Callable[[Choice, str, list[int]], None] | None) -> None:
        """Follows one choice's engine request to its end (a stop string closes the stream,
        which aborts the engine request), calling emit with each delta."""
        async with contextlib.aclosing(engine.stream(c.request_id)) as outputs:
            async for out in outputs:
                text, ids = c.take(out)
                if ids and c.first is None:
                    c.first = time.perf_counter()
                if emit is not None and (text or ids or c.finish_reason):
                    emit(c, text, ids)
                if c.finish_reason is not None:
                    break
        metrics.request_done(len(c.prompt), len(c.token_ids), c.finish_reason, c.arrival, c.first,
                             time.perf_counter())

    async def collect(choices: list[Choice], request: Request) -> None:
        """Runs the choices to their end, or aborts them all if the client leaves first or one
        of them fails."""
        tasks = [asyncio.ensure_future(run_choice(c, None)) for c in choices]
        watch = cancel_on_disconnect(request, tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            watch.cancel()
            for t in tasks:  # those still running (one failed, or the client left): their requests are aborted
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise api_error(failures[0]) from failures[0]
        if any(isinstance(r, asyncio.CancelledError) for r in results):
            raise APIError(499, "client disconnected")

    def stream_choices(choices: list[Choice], request: Request):
        """Starts the choices now and returns an async iterator of (choice, text, token ids) as
        they commit, over all choices, until every choice has ended or the client has left
        (which aborts them, even before the response has started)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def run(c):
            try:
                await run_choice(c, lambda *delta: queue.put_nowait(delta))
            except Exception as e:  # reported in the stream: the status line is already sent
                queue.put_nowait(e)
            finally:
                queue.put_nowait(None)  # this choice has ended

        tasks = [asyncio.ensure_future(run(c)) for c in choices]
        watch = cancel_on_disconnect(request, tasks)

        async def events():
            running = len(tasks)
            try:
                while running:
                    item = await queue.get()
                    if isinstance(item, Exception):
                        raise item
                    if item is None:
                        running -= 1
                    else:
                        yield item
            finally:
                watch.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(watch, *tasks, return_exceptions=True)

        return events()

    async def sse(events, head: dict, kind: str, chat: bool, body, usage: Callable[[], dict], include_usage: bool):
        obj = kind + ".chunk" if chat else kind

        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **extra})}\n\n"

        extra = {"usage": None} if include_usage else {}
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(body.n)], **extra)
            async for c, text, ids in events:
                item = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": None}
                item.update({"delta": {"content": text} if text else {}} if chat else {"text": text})
                if c.finish_reason is not None:
                    item["stop_reason"] = c.stop_reason
                if body.return_token_ids:
                    item["token_ids"] = ids
                yield chunk([item], **extra)
            if include_usage:
                yield chunk([], usage=usage())
        except Exception as e:  # noqa: BLE001 -- the stream's status is sent; the error goes in it
            error = api_error(e)
            body = {"error": {"message": error.message, "type": error.kind, "param": None, "code": error.status}}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return app


def api_error(e: Exception) -> APIError:
    """The error a choice's failure is answered with: 503 if an engine in another process refused
    it after this process's queue check let it through (`EngineClient`), 500 otherwise."""
    if isinstance(e, EngineFull):
        return APIError(503, str(e), kind="server_overloaded")
    return APIError(500, str(e), kind="server_error")


def choice_seed(seed: int, i: int) -> int:
    """The engine seed (in [0, 2**32)) of choice i of a request with this seed."""
    if i == 0:
        return seed % 2**32
    return int(np.random.SeedSequence([seed % 2**64, i]).generate_state(1)[0])


def encode(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
    return list(tokenizer.encode(prompt))


def cancel_on_disconnect(request: Request, tasks: list[asyncio.Future]) -> asyncio.Task:
    """A task that cancels `tasks` when the client closes the connection (at once, whether or
    not a response is being written at that moment)."""

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for t in tasks:
            t.cancel()

    return asyncio.ensure_future(watch())
