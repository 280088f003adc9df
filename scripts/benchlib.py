"""Hardware probes and load settings shared by the benchmark scripts."""

from __future__ import annotations

import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.evaluation.step_times import timed


def requests_per_level(concurrency: int) -> int:
    """Requests a closed-loop serving level measures (bench_engine and bench_serving alike):
    four waves of `concurrency`, at least 16, so that a level's first and last waves (requests
    arriving together, the batch draining) weigh little."""
    return max(4 * concurrency, 16)


def level_requests(num_prompts: list[int] | None, levels: list, default) -> list[int]:
    """Requests each load level measures, in the levels' order: a --num-prompts given once (every
    level) or once per level, else `default(level)`; a ValueError names a mismatch."""
    if not num_prompts:
        return [default(level) for level in levels]
    if len(num_prompts) not in (1, len(levels)):
        raise ValueError(f"--num-prompts takes one count or one per level ({len(levels)}), got {len(num_prompts)}")
    if min(num_prompts) < 1:
        raise ValueError(f"--num-prompts must be positive, got {min(num_prompts)}")
    return num_prompts * len(levels) if len(num_prompts) == 1 else list(num_prompts)


def step_profile(steps: float, step_seconds: float, seconds: float, wait_seconds: float) -> dict:
    """A serving engine's mean wall time per step over a level (`steps` steps, `step_seconds`
    inside them, in a level of `seconds`), the part of it blocked on the device (`wait_ms`, of
    `wait_seconds`: near 0 when the host's own work per step is the bottleneck), and the share
    of the level it spent stepping (1.0 when steps follow each other without a gap); NaN
    without steps (a server that does not count them). bench_engine and bench_serving alike."""
    if not steps:
        return {"step_ms": float("nan"), "wait_ms": float("nan"), "stepping": float("nan")}
    return {"step_ms": 1e3 * step_seconds / steps, "wait_ms": 1e3 * wait_seconds / steps,
            "stepping": step_seconds / seconds}


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


def kernel_times(run, steps: int) -> dict[str, tuple[float, float]]:
    """GPU kernel name -> (ms per step, launches per step) over `steps` calls of run(), which
    must block until its work is done. Needs torch beside jax on a CUDA machine: torch's
    profiler reads CUPTI's kernel records, which cover every kernel in the process, XLA's
    included. The names are XLA's fusion names (as in the compiled HLO) or the libraries' own."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    return {e.key: (e.device_time_total / steps / 1e3, e.count / steps)
            for e in prof.key_averages() if e.device_time_total}


def print_kernel_times(times: dict[str, tuple[float, float]], title: str, top: int, group: bool = False) -> None:
    """The `top` kernels by time, after the total; `group` strips the per-instance number
    (gemm_fusion_dot.17 -> gemm_fusion_dot) and sums each name's kernels."""
    if group:
        grouped = collections.defaultdict(lambda: [0.0, 0.0])
        for name, (ms, count) in times.items():
            key = re.sub(r"[_.]\d+$", "", name)
            grouped[key][0] += ms
            grouped[key][1] += count
        times = {k: tuple(v) for k, v in grouped.items()}
    total = sum(ms for ms, _ in times.values())
    launches = sum(count for _, count in times.values())
    print(f"{title}: {total:.3f} ms of kernel time and {launches:.0f} kernels per step")
    for name, (ms, count) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{ms:8.3f} ms {count:6.0f}x  {name[:100]}")
