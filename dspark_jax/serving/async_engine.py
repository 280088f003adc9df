"""`AsyncEngine`: an `Engine` driven by an asyncio task, streaming each request's tokens.

One background task owns the engine. Between steps it applies the requests added and
cancelled since the last step, then runs `Engine.step` in a worker thread (so the event loop
stays responsive while the device works) and routes each `RequestOutput` to the queue of its
request. `generate` is an async generator over those deltas; leaving it early (break,
cancellation, a closed HTTP connection) aborts the request, which frees its slot and pages
before the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
from typing import AsyncIterator, Sequence

from dspark_jax.serving.engine import Engine, EngineFull, EngineStats
from dspark_jax.serving.params import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._ids = itertools.count()
        self._failure: BaseException | None = None

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        """Queues a request for the next step and returns its id; read its deltas with
        `stream`. Raises ValueError for a bad request and EngineFull when the queue is full,
        with nothing queued."""
        params = SamplingParams() if params is None else params
        self.engine.check_request(prompt_ids, params)
        if self._failure is not None:
            raise RuntimeError("the engine stopped after a failed step") from self._failure
        if len(self._adds) + self.engine.num_queued >= self.engine.max_waiting:
            raise EngineFull(f"the engine's queue is full ({self.engine.max_waiting} waiting requests); retry later")
        rid = f"async-{next(self._ids)}" if request_id is None else str(request_id)
        if rid in self._queues:
            raise ValueError(f"request_id {rid!r} is already in use")
        self._queues[rid] = asyncio.Queue()
        self._adds.append((rid, list(prompt_ids), params))
        self._kick()
        return rid

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yields a request's deltas until one is finished; leaving early aborts it. Deltas
        that queued up while the consumer was busy come as one, their tokens joined, so a
        consumer that falls behind does its per-delta work once per read, not once per step."""
        queue = self._queues[request_id]
        finished = False
        try:
            while not finished:
                item, error = await queue.get(), None
                while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        error = more
                        break
                    item = RequestOutput(request_id, item.new_token_ids + more.new_token_ids, more.finished,
                                         more.finish_reason)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if error is not None:
                    raise error
        finally:
            if not finished:
                self.abort(request_id)
            self._queues.pop(request_id, None)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """`add_request`, then its deltas until one is finished; leaving early aborts it."""
        rid = self.add_request(prompt_ids, params, request_id=request_id)
        async for output in self.stream(rid):
            yield output

    def abort(self, request_id: str) -> None:
        """Cancels a request before the next step, freeing its slot and pages."""
        if self._queues.pop(request_id, None) is not None:
            self._aborts.append(request_id)
            self._kick()

    @property
    def failed(self) -> bool:
        """True once a step has failed (every request then fails; the process should restart)."""
        return self._failure is not None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._worker.shutdown(wait=True)

    def _kick(self) -> None:
        if self._failure is not None:  # a failed engine is not stepped again
            return
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def _apply_changes(self) -> None:
        """Adds and aborts queued since the last step (only between steps: the engine is not
        thread-safe, and no step runs now)."""
        adds, self._adds = self._adds, []
        for rid, prompt, params in adds:
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except (ValueError, EngineFull) as error:
                self._deliver(rid, error)
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            self.engine.abort(rid)

    def _deliver(self, rid: str, item) -> None:
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(item)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_changes()
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._worker, self.engine.step)
            except Exception as error:  # the device state is lost: fail every request, loudly
                log.exception("engine step failed")
                self._failure = error
                for queue in self._queues.values():
                    queue.put_nowait(RuntimeError(f"engine step failed: {error}"))
                return
            for output in outputs:
                self._deliver(output.request_id, output)
