"""The engine's device programs by shape, compiled ahead of need.

Each engine program (a prefill, a decoding round) is specialised on bucketed shapes, and the
first step that needs a new shape would compile it: seconds on a GPU, during which every
running request waits. `Programs` compiles instead on a background thread and, until a shape
is ready, runs the smallest compiled program whose shape covers the step: at least as many
rows and as wide chunks, the same in everything else (a step padded to it runs the extra rows
idle). A step waits for a compilation only when no compiled program covers it. `precompile`
asks for the largest shapes up front, so that once they are ready no step has to wait.

A key is (kind, sizes, exact): sizes is a tuple of ints that a program covers when each of
its own is at least as large; exact must be equal.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable, Hashable

log = logging.getLogger(__name__)

Key = tuple[str, tuple[int, ...], tuple[Hashable, ...]]


def covers(program: Key, step: Key) -> bool:
    """Whether `program` can run `step` (same kind and exact fields, sizes at least as large)."""
    return (program[0], program[2]) == (step[0], step[2]) and all(a >= b for a, b in zip(program[1], step[1]))


class Programs:
    """Compiled programs by key. compile: key -> a callable (a `jax.stages.Compiled`), run on
    the background thread when `background` (else at the step that first needs the key)."""

    def __init__(self, compile: Callable[[Key], Callable], background: bool = True):
        self._compile = compile
        self._ready: dict[Key, Callable] = {}
        self._pending: dict[Key, concurrent.futures.Future] = {}
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-compile") \
            if background else None
        self.stalls = 0  # steps that waited for a compilation

    def __len__(self) -> int:
        """Programs compiled so far."""
        self._collect()
        return len(self._ready)

    def precompile(self, keys) -> None:
        """Starts compiling `keys` (on the background thread; without one, now)."""
        for key in keys:
            if key not in self._ready and key not in self._pending:
                if self._worker is None:
                    self._ready[key] = self._compile(key)
                else:
                    self._pending[key] = self._worker.submit(self._compile, key)

    def get(self, key: Key) -> tuple[Key, Callable]:
        """(key of the program to run, the program) for a step of shape `key`: its own program
        if compiled, else the smallest compiled one that covers it (asking for its own in the
        background), else its own after waiting for it to compile (a stall)."""
        self._collect()
        if key not in self._ready and self._worker is not None:
            cover = min((k for k in self._ready if covers(k, key)), key=lambda k: k[1], default=None)
            if cover is not None:
                self.precompile([key])
                return cover, self._ready[cover]
        if key not in self._ready:
            self.stalls += 1
            log.info("a step waits for its %s program of sizes %s to compile", key[0], key[1])
            future = self._pending.pop(key, None)
            self._ready[key] = self._compile(key) if future is None else future.result()
        return key, self._ready[key]

    def wait(self) -> None:
        """Blocks until every program asked for is compiled."""
        for key, future in list(self._pending.items()):
            self._ready[key] = future.result()
            del self._pending[key]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def _collect(self) -> None:
        """Moves finished compilations to the ready set (a failed one raises here)."""
        for key, future in list(self._pending.items()):
            if future.done():
                self._ready[key] = future.result()
                del self._pending[key]
