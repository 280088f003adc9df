"""The engine's device programs by shape, compiled ahead of need.

Each engine program (a prefill, a decoding round) is specialised on bucketed shapes, and the
first step that needs a new shape would compile it: seconds on a GPU, during which every
running request waits. `Programs` compiles instead on background threads and, until a shape
is ready, runs the cheapest compiled program whose shape covers the step: at least as many
rows and as wide chunks, the same in everything else (a step padded to it runs the extra rows
idle), where the engine allows it (`allowed`: its bound on how much larger a cover may be).
A step waits for a compilation only when no allowed compiled program covers it; the shapes
steps ask for compile before those `precompile` asked for. XLA compiles outside Python's GIL,
so several threads (`threads`) can compile several programs at once.

A key is (kind, sizes, exact): sizes is a tuple of ints that a program covers when each of
its own is at least as large; exact must be equal.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import queue
import threading
import weakref
from typing import Callable, Hashable

log = logging.getLogger(__name__)

Key = tuple[str, tuple[int, ...], tuple[Hashable, ...]]
_ASKED, _AHEAD = 0, 1  # priorities: a shape a step needs, then the precompiled ones


def covers(program: Key, step: Key) -> bool:
    """Whether `program` can run `step` (same kind and exact fields, sizes at least as large)."""
    return (program[0], program[2]) == (step[0], step[2]) and all(a >= b for a, b in zip(program[1], step[1]))


class Programs:
    """Compiled programs by key. compile: key -> a callable (a `jax.stages.Compiled`), held
    weakly when it is a bound method (the engine's: the engine is not kept alive by its
    programs), run on `threads` daemon threads when `background` (else at the step that first
    needs the key), which take the queued keys in priority order; allowed(cover, step): whether
    `cover` may run `step` padded."""

    def __init__(self, compile: Callable[[Key], Callable], background: bool = True,
                 allowed: Callable[[Key, Key], bool] = lambda cover, step: True, threads: int = 1):
        self._compile_ref = weakref.WeakMethod(compile) if hasattr(compile, "__self__") else lambda: compile
        self._allowed = allowed
        self._ready: dict[Key, Callable] = {}
        self._pending: dict[Key, concurrent.futures.Future] = {}
        self._queue: queue.PriorityQueue | None = None
        if background:
            self._queue = queue.PriorityQueue()
            self._order = itertools.count()
            self._threads = threads
            for i in range(threads):
                threading.Thread(target=_work, args=(self._queue,), name=f"engine-compile-{i}", daemon=True).start()
        self.stalls = 0  # steps that waited for a compilation

    def __len__(self) -> int:
        """Programs compiled so far (read-only: safe from another thread than the steps')."""
        done = [f for f in list(self._pending.values()) if f.done() and not f.cancelled()]
        return len(self._ready) + sum(f.exception() is None for f in done)

    @property
    def pending(self) -> int:
        """Compilations asked for and not finished."""
        return sum(not f.done() for f in list(self._pending.values()))

    def precompile(self, keys) -> None:
        """Starts compiling `keys` (on the background thread, after any shape a step asked
        for; without one, now)."""
        for key in keys:
            self._ask(key, _AHEAD)

    def get(self, key: Key) -> tuple[Key, Callable]:
        """(key of the program to run, the program) for a step of shape `key`: its own program
        if compiled, else the cheapest allowed compiled one that covers it (asking for its own
        in the background), else its own after waiting for it to compile (a stall)."""
        self._collect()
        if key not in self._ready and self._queue is not None:
            covering = [k for k in self._ready if covers(k, key) and self._allowed(k, key)]
            if covering:
                self._ask(key, _ASKED)
                cover = min(covering, key=lambda k: math.prod(k[1]))
                return cover, self._ready[cover]
        if key not in self._ready:
            self.stalls += 1
            log.info("a step waits for its %s program of sizes %s to compile", key[0], key[1])
            future = self._pending.pop(key, None)
            if future is not None and not future.cancel():  # compiling now: wait for it
                self._ready[key] = future.result()
            else:
                self._ready[key] = self._build(key)
        return key, self._ready[key]

    def wait(self) -> None:
        """Blocks until every compilation asked for has finished."""
        for future in list(self._pending.values()):
            concurrent.futures.wait([future])
        self._collect()

    def close(self) -> None:
        """Drops the compilations not started and stops the background threads."""
        for future in self._pending.values():
            future.cancel()
        if self._queue is not None:
            for i in range(self._threads):
                self._queue.put((-1, -i, None, None))  # before anything queued: one for each thread to end on
            self._queue = None

    def _ask(self, key: Key, priority: int) -> None:
        if key in self._ready or key in self._pending:
            return
        if self._queue is None:
            self._ready[key] = self._build(key)
            return
        future = concurrent.futures.Future()
        self._pending[key] = future
        self._queue.put((priority, next(self._order), key, (future, self._build)))

    def _build(self, key: Key) -> Callable:
        compile = self._compile_ref()
        if compile is None:
            raise RuntimeError("the engine is gone")
        return compile(key)

    def _collect(self) -> None:
        """Moves finished compilations to the ready set. A failed one is logged and dropped:
        a step that needs its shape compiles it again (and fails then, if it still fails)."""
        for key, future in list(self._pending.items()):
            if future.done():
                del self._pending[key]
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    log.warning("compiling the %s program of sizes %s failed: %r", key[0], key[1], future.exception())
                    continue
                self._ready[key] = future.result()


def _work(jobs: queue.PriorityQueue) -> None:
    """A background thread: compiles queued keys, highest priority first, until closed."""
    while True:
        _, _, key, job = jobs.get()
        if key is None:
            return
        future, build = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(build(key))
        except BaseException as error:  # handed to the steps' thread
            future.set_exception(error)
