"""Hardware probes shared by the benchmark scripts."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.evaluation.step_times import timed


def matmul_rate(n: int) -> float:
    """bf16 FLOP/s of an n x n x n matrix product on random data."""
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / timed(lambda: mm(a, b).block_until_ready())


def median_seconds(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Bytes read plus written per second by an elementwise pass over 4 GiB (after a second of
    such passes, so that the clocks have risen)."""
    x = jnp.ones((1 << 31,), jnp.bfloat16)
    step = jax.jit(lambda a: a + 1)
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
        jax.block_until_ready(step(x))
    return 2 * x.nbytes / median_seconds(step, x, reps=50)


def announce_bandwidth(setting: str) -> float:
    """The copy bandwidth, printed with the device and the benchmark's setting."""
    bandwidth = copy_bandwidth()
    print(f"{jax.devices()[0].device_kind}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); {setting}")
    return bandwidth
