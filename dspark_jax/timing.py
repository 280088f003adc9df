"""Timing helpers for the benchmark scripts: medians of repeated, blocking device calls."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, *, warmup: int = 3, reps: int = 7, iters: int = 10) -> float:
    """Median seconds per call of fn() (fn must block on its result); the first call compiles."""
    start = time.perf_counter()
    fn()
    log(f"  first call {time.perf_counter() - start:.1f} s")
    for _ in range(warmup - 1):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def timed_chain(program, carry, iters: int, reps: int = 7) -> float:
    """Median seconds per call of a program whose (donated) output is its next input."""
    state = [carry]

    def call():
        state[0] = program(state[0])
        jax.block_until_ready(state[0])

    return timed(call, iters=iters, reps=reps, warmup=2)


def matmul_rate(n: int) -> float:
    """bf16 FLOP/s of an n x n x n matrix product on random data."""
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / timed(lambda: mm(a, b).block_until_ready())
