"""Asyncio fronts of an `Engine`, streaming each request's tokens.

Each takes requests and aborts from the event loop and routes each `RequestOutput` to the queue
of its request; `generate`/`stream` are async generators over those deltas, and leaving one
early (break, cancellation, a closed HTTP connection) aborts the request, which frees its
slot and pages before the next step.

- `AsyncEngine` drives an engine in this process: one background task applies the requests
  added and cancelled since the last step, then runs `Engine.step` in a worker thread (so the
  event loop stays responsive while the device works).
- `EngineProcess` builds and steps the engine in a child process (as vLLM's engine core runs),
  so the event loop's per-token work (detokenizing, events, socket writes) and the engine's
  host work do not share one interpreter lock. Requests are checked in the parent against
  the engine's `RequestLimits` before they are sent.
- `EngineClient` is the same front over a connection to that child from another process:
  with `EngineProcess(build, clients=True)` the child also listens on a Unix socket, so that
  several HTTP server processes (`serve.py --api-server-count N`) share one engine, each
  receiving only its own requests' outputs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import secrets
import signal
import threading
import time
import weakref
from multiprocessing.connection import Client, Connection, Listener, arbitrary_address, wait
from queue import SimpleQueue
from typing import AsyncIterator, Callable, Sequence

from dspark_jax.serving.engine import Engine, EngineFull, EngineStats, RequestLimits, freeze_heap
from dspark_jax.serving.params import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class _Front:
    """What the fronts share: per-request queues, streaming, aborting, failing. `on_failure`, if
    set, is called once on the event loop when the engine fails (serve.py then stops: as vLLM's
    server does, it exits to be restarted rather than answer 503 for ever)."""

    limits: RequestLimits

    def __init__(self, id_prefix: str = "async"):
        self._queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._id_prefix = id_prefix
        self._failure: BaseException | None = None
        self._closed = False  # shut down: takes no more requests
        self.on_failure: Callable[[BaseException], None] | None = None

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        """Queues a request for the next step and returns its id; read its deltas with
        `stream`. Raises ValueError for a bad request and EngineFull when the queue is full,
        with nothing queued."""
        params = SamplingParams() if params is None else params
        self.limits.check(prompt_ids, params)
        if self._failure is not None:
            raise RuntimeError(f"the engine failed ({self._failure})") from self._failure
        if self._closed:
            raise RuntimeError("the engine was shut down")
        if self._queued() >= self.limits.max_waiting:
            raise EngineFull(f"the engine's queue is full ({self.limits.max_waiting} waiting requests); retry later")
        rid = f"{self._id_prefix}-{next(self._ids)}" if request_id is None else str(request_id)
        if rid in self._queues:
            raise ValueError(f"request_id {rid!r} is already in use")
        self._queues[rid] = asyncio.Queue()
        self._submit(rid, list(prompt_ids), params)
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

    async def start(self) -> None:
        """Binds the front to the running event loop ahead of its first request (a server does
        it at start-up), so that `stats()` is current from then on. `AsyncEngine` reads its
        engine's statistics directly: nothing to do."""

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """`add_request`, then its deltas until one is finished; leaving early aborts it."""
        rid = self.add_request(prompt_ids, params, request_id=request_id)
        async for output in self.stream(rid):
            yield output

    def abort(self, request_id: str) -> None:
        """Cancels a request before the next step, freeing its slot and pages."""
        if self._queues.pop(request_id, None) is not None:
            self._cancel(request_id)

    @property
    def failed(self) -> bool:
        """True once the engine has failed (a step raised, or its process is gone): every
        request then fails."""
        return self._failure is not None

    @property
    def failure(self) -> BaseException | None:
        """Why the engine failed (None while it has not)."""
        return self._failure

    def _deliver(self, rid: str, item) -> None:
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(item)

    def _fail(self, error: BaseException) -> None:
        """The device state is lost: every request fails, loudly."""
        self._failure = error
        self._end_streams(RuntimeError(f"the engine failed: {error}"))
        if self.on_failure is not None:
            self.on_failure(error)

    def _end_streams(self, error: BaseException) -> None:
        """Every open stream raises `error` (the engine will send them nothing more)."""
        for queue in self._queues.values():
            queue.put_nowait(error)


class AsyncEngine(_Front):
    """An `Engine` driven in this process by an asyncio task (module docstring)."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.limits = engine.limits
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Stops stepping; streams still open raise RuntimeError."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._worker.shutdown(wait=True)
        self.engine.close()
        self._end_streams(RuntimeError("the engine was shut down"))

    def _queued(self) -> int:
        return len(self._adds) + self.engine.num_queued

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self._adds.append((rid, prompt, params))
        self._kick()

    def _cancel(self, rid: str) -> None:
        self._aborts.append(rid)
        self._kick()

    def _kick(self) -> None:
        if self._failure is not None or self._closed:  # a failed or closed engine is not stepped again
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
            except Exception as error:
                log.exception("engine step failed")
                self._fail(error)
                return
            for output in outputs:
                self._deliver(output.request_id, output)


class EngineClient(_Front):
    """A front over `conn`, a connection to an engine process whose first message is its
    "ready" (or "failed", raised here). `tokenizer` and `model_name` are what the engine's
    build returned; request ids start with `id_prefix`, which must differ between the
    clients of one engine. `connect` opens one to an `EngineProcess(..., clients=True)`.

    The constructor reads the engine's "ready"; from `start` (or the first request) on, two
    threads move messages so that the event loop never waits on the pipe: one sends the loop's
    requests and aborts in order, one receives the engine's messages and hands them to the
    loop."""

    def __init__(self, conn: Connection, id_prefix: str = "async"):
        super().__init__(id_prefix)
        self._conn = conn
        try:
            message = conn.recv()
        except Exception as error:  # EOF, or an exception this process cannot rebuild
            message = ("failed", RuntimeError(f"the engine process failed while starting ({error!r})"))
        if message[0] == "failed":
            conn.close()
            raise message[1]
        _, self.limits, self.tokenizer, self.model_name, self._stats, self._child_queued = message
        self._sent = self._consumed = 0  # add messages sent, and taken by the engine
        self._outbox: SimpleQueue = SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def connect(cls, address: str, authkey: bytes, id_prefix: str) -> EngineClient:
        """A client of the engine process listening at `address` (`EngineProcess.address`)."""
        return cls(Client(address, family="AF_UNIX", authkey=authkey), id_prefix)

    def stats(self) -> EngineStats:
        """The engine's statistics as of its last step (or last change)."""
        return self._stats

    async def shutdown(self) -> None:
        """Says "stop": the engine aborts what this client still has and forgets it (streams
        still open raise RuntimeError)."""
        self._closed = True
        self._outbox.put(("stop",))
        if self._loop is None:  # nothing was ever sent: no sender thread
            try:
                self._conn.send(("stop",))
            except OSError:  # the engine is gone already
                pass
        self._end_streams(RuntimeError("the engine client was shut down"))

    def _queued(self) -> int:
        return self._child_queued + self._sent - self._consumed

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self._sent += 1
        self._send(("add", rid, prompt, params))

    def _cancel(self, rid: str) -> None:
        self._send(("abort", rid))

    async def start(self) -> None:
        """Starts taking the engine's messages on the running event loop. Until then (or the
        first request, which starts it too) `stats()` stays as the engine was when this client
        connected: compilations started at build time, say, seem pending for ever."""
        self._bind()

    def _bind(self) -> None:
        if self._loop is None:  # on the loop that will receive the outputs
            self._loop = asyncio.get_running_loop()
            threading.Thread(target=self._sender, name="engine-send", daemon=True).start()
            threading.Thread(target=self._receiver, name="engine-receive", daemon=True).start()

    def _send(self, message) -> None:
        self._bind()
        self._outbox.put(message)

    def _sender(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except OSError as error:
                self._call(self._failed, f"the engine process is gone ({error})")
                return
            except Exception as error:  # this request could not be pickled: it fails alone
                self._call(self._unsent, message[1], RuntimeError(f"request not sent to the engine: {error!r}"))
            if message[0] == "stop":
                return

    def _receiver(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except Exception as error:  # EOF when the engine is gone, or a message that cannot be read
                if not self._closed:
                    self._call(self._failed, f"the engine process stopped unexpectedly ({error!r})")
                return
            self._call(self._receive, message)

    def _unsent(self, rid: str, error: BaseException) -> None:
        self._sent -= 1
        self._deliver(rid, error)

    def _call(self, fn, *args) -> None:
        """fn(*args) on the event loop, unless it has closed."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def _receive(self, message) -> None:
        kind, *rest = message
        if kind == "outputs":
            outputs, *rest = rest
            for output in outputs:
                self._deliver(output.request_id, output)
        if kind in ("outputs", "stats"):
            self._stats, self._child_queued, self._consumed = rest
        elif kind == "refused":
            self._deliver(*rest)
        else:  # "failed"
            self._failed(rest[0])

    def _failed(self, message: str) -> None:
        if self._failure is None:
            log.error("engine failed: %s", message)
            self._fail(RuntimeError(message))


class EngineProcess(EngineClient):
    """An engine built by `build` (a picklable callable returning (Engine, tokenizer, model
    name)) and stepped in a child process (module docstring), with this object its first
    client. Blocks until the engine is ready; raises what `build` raised if it could not be
    built. With `clients=True` the child also takes `EngineClient.connect(address, authkey,
    ...)` from other processes; it then sends this object nothing after "ready" (a
    supervisor's handle, which only starts and stops the engine, and takes no requests)."""

    def __init__(self, build: Callable[[], tuple[Engine, object, str]], clients: bool = False):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited device state
        conn, child = context.Pipe()
        # a socket path in a directory only this user can enter (removed when this process exits)
        self.address = arbitrary_address("AF_UNIX") if clients else None
        self.authkey = secrets.token_bytes(32) if clients else None
        self._process = context.Process(target=_engine_main, args=(child, build, self.address, self.authkey),
                                        name="dspark-engine", daemon=True)
        self._process.start()
        child.close()
        # the child ignores SIGTERM (the parent drains first), so at exit it is killed
        weakref.finalize(self, self._process.kill)
        try:
            super().__init__(conn)
        except BaseException:
            self._process.join(10)
            self._process.kill()
            raise

    @property
    def sentinel(self) -> int:
        """Ready (for `multiprocessing.connection.wait`) when the child process has ended."""
        return self._process.sentinel

    @property
    def exitcode(self) -> int | None:
        """The child's exit code (negative: the signal that ended it); None while it runs."""
        return self._process.exitcode

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        if self.address is not None:
            raise RuntimeError("an engine process with clients takes requests from them (EngineClient.connect), "
                               "not from its supervisor's handle")
        return super().add_request(prompt_ids, params, request_id=request_id)

    async def shutdown(self) -> None:
        """Stops the engine (its clients' requests end with it) and waits for the child."""
        await super().shutdown()
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            self._process.kill()
            await asyncio.to_thread(self._process.join, 10)


class _Clients:
    """The engine process's side of its clients' connections: which client each request came
    from, so that its outputs and refusal go back there alone, and how many requests each
    client has sent that the engine has taken (its `_queued` count)."""

    def __init__(self, engine: Engine, tokenizer, name: str):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.taken: dict[Connection, int] = {}  # connections open, and their add messages taken
        self.owner: dict[str, Connection] = {}  # request id -> its client, until it finishes

    def ready(self) -> tuple:
        e = self.engine
        return ("ready", e.limits, self.tokenizer, self.name, e.stats(), e.num_queued)

    def add(self, conn: Connection, announce: bool = True) -> None:
        """A new client; `announce`: send it "ready" (False: it has it already)."""
        self.taken[conn] = 0
        if announce:
            self.send(conn, self.ready())

    def drop(self, conn: Connection) -> None:
        """A client that stopped or is gone: its requests are aborted, its connection closed."""
        if self.taken.pop(conn, None) is None:
            return
        for rid in [rid for rid, owner in self.owner.items() if owner is conn]:
            del self.owner[rid]
            self.engine.abort(rid)
        conn.close()

    def send(self, conn: Connection, message) -> None:
        try:
            conn.send(message)
        except OSError:  # the client is gone
            self.drop(conn)

    def take(self, conn: Connection) -> None:
        """Applies what `conn` sent since the last step."""
        while conn in self.taken:
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except Exception:  # the client is gone (EOF), or sent what cannot be read: it alone is dropped
                self.drop(conn)
                return
            try:
                kind, *body = message
                if kind == "stop":
                    self.drop(conn)
                elif kind == "abort":
                    (rid,) = body
                    if self.owner.get(rid) is conn:
                        del self.owner[rid]
                        self.engine.abort(rid)
                elif kind == "add":
                    self._add(conn, *body)
                else:
                    raise ValueError(f"unknown message kind {kind!r}")
            except Exception as error:  # a message no client of ours sends: that client is dropped, not the engine
                log.warning("dropping an engine client that sent %.80r: %r", message, error)
                self.drop(conn)
                return

    def _add(self, conn: Connection, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self.taken[conn] += 1
        try:
            self.engine.add_request(prompt, params, request_id=rid)
        except (ValueError, EngineFull) as error:
            self.send(conn, ("refused", rid, error))
            return
        self.owner[rid] = conn

    def publish(self, outputs: list[RequestOutput] | None) -> None:
        """A step's outputs, each to its client, with the engine's statistics to every client
        (None: only the statistics)."""
        mine: dict[Connection, list[RequestOutput]] = {conn: [] for conn in self.taken}
        for output in outputs or ():
            conn = self.owner.get(output.request_id)
            if conn is not None:
                mine[conn].append(output)
                if output.finished:
                    del self.owner[output.request_id]
        stats, queued = self.engine.stats(), self.engine.num_queued
        for conn, batch in mine.items():
            if outputs is None:
                self.send(conn, ("stats", stats, queued, self.taken[conn]))
            else:
                self.send(conn, ("outputs", batch, stats, queued, self.taken[conn]))

    def fail(self, message: str) -> None:
        for conn in list(self.taken):
            self.send(conn, ("failed", message))


def _engine_main(conn, build, address: str | None = None, authkey: bytes | None = None) -> None:
    """The child process: builds the engine, then steps it while any request is unfinished,
    taking its clients' requests and aborts between steps, and sends each client its
    requests' outputs of every step with the engine's statistics. `conn` is the parent's:
    without `address` its only client, whose "stop" (or exit) ends the child; with one, the
    supervisor's, which gets "ready" and later says "stop", while the clients connect at
    `address` (a thread accepts them, waking the loop through a pipe) and come and go. A
    signal is the parent's to handle: it drains its requests, then sends "stop"."""
    from dspark_jax.console import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging()
    engine = None
    try:
        engine, tokenizer, name = build()
        freeze_heap()
        listener = None if address is None else Listener(address, family="AF_UNIX", authkey=authkey)
        clients = _Clients(engine, tokenizer, name)
        conn.send(clients.ready())  # (a tokenizer that does not pickle fails here, and is reported)
    except Exception as error:  # the parent raises it (a bad flag or checkpoint is the user's error)
        if engine is not None:
            engine.close()
        try:
            conn.send(("failed", error))
        except Exception:  # it does not pickle
            conn.send(("failed", RuntimeError(f"the engine did not start: {type(error).__name__}: {error}")))
        return
    watched: list = []  # what the loop waits on besides the clients: the supervisor, new clients' wake-up
    woken = None
    if listener is None:
        clients.add(conn, announce=False)
    else:
        arrived: SimpleQueue = SimpleQueue()
        wake, woken = multiprocessing.Pipe()
        threading.Thread(target=_accept, args=(listener, arrived, wake), name="engine-accept", daemon=True).start()
        watched = [conn, woken]
    compiling = engine.compiles_pending
    try:
        while clients.taken or watched:
            busy = engine.has_unfinished()
            # idle: wait for a message (or, while programs compile, a second)
            ready = wait([*clients.taken, *watched], 0 if busy else 1.0 if compiling else None)
            pending = engine.compiles_pending
            changed, compiling = pending != compiling or bool(ready), pending  # the gauge follows compilations
            if conn in ready and listener is not None:  # the supervisor says "stop" (or is gone)
                return
            if woken is not None and woken in ready:
                woken.recv()
                clients.add(arrived.get())
            for client in ready:
                if client in clients.taken:
                    clients.take(client)
            if engine.has_unfinished():
                clients.publish(engine.step())
            elif changed:
                clients.publish(None)
    except Exception as error:
        log.exception("the engine failed")
        clients.fail(f"{type(error).__name__}: {error}")
    finally:
        engine.close()  # no more background compilation


def _accept(listener: Listener, arrived: SimpleQueue, wake: Connection) -> None:
    """The engine process's thread that takes new clients (their handshake checks the key; the
    socket's directory admits only this user, so a client that stalls it is one of ours)."""
    while True:
        try:
            client = listener.accept()
        except (OSError, EOFError, multiprocessing.AuthenticationError) as error:
            log.warning("a client could not connect to the engine: %r", error)
            time.sleep(0.1)  # (out of file descriptors, say: no busy loop)
            continue
        arrived.put(client)
        wake.send(None)
