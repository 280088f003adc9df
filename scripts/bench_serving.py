"""Load generator for serve.py (or any OpenAI-compatible server): throughput and latency.

    python serve.py --dtype bfloat16 &
    python scripts/bench_serving.py --prompts ../shared/data/eval/mt-bench.jsonl --concurrency 1 4 16 64
    python scripts/bench_serving.py --prompts prompts.txt --request-rate 8 --num-prompts 200

Each request is a streamed chat completion of one prompt of the file (first user turns of
{"turns": [...]} records, or one prompt a line) asking for --max-tokens tokens at
temperature 0 with EOS ignored, so every run produces the same amount of text. Load is
either a closed loop per concurrency c (c requests in flight, max(4c, 16) requests unless
--num-prompts gives a count for every level or one per level, each new one sent when one
finishes, split over --client-processes processes that each keep their share in flight) or
open-loop Poisson arrivals at --request-rate requests/s.
Before each measured level the same load runs to warm the server up (compilation), again
until a pass meets no program shape the server had not run (at most --warmup-passes), and
the level starts once the server compiles nothing in the background. A server started with
--precompile (the default on a GPU) first compiles every program shape its context allows,
which takes minutes for a 30-layer model; the first level waits for that (saying so). To
compare with `bench_engine.py`, whose engine compiles only the shapes its warm-up meets,
start the server with --no-precompile.

Reported per level: requests/s, output tokens/s (usage counts over wall time), time to first
token (TTFT) and time per output token after the first (TPOT) p50/p99 over requests, and the
server's mean tokens per decoding round over the level (from its /metrics; 1.0 without a
draft), its engine's mean wall time per step, the part of it blocked on the device, and the
share of the level it spent stepping (as `bench_engine.py` reports them: a share well below
the engine's in process means the engine waited between steps), and the engine programs the
server compiled during the measured run (a nonzero count warns that compilation overlapped
it), and the CPU seconds per second of the level of this client's busiest process and of the
server's process (its /metrics' process_cpu_seconds_total: serve.py's HTTP process with its
threads, and its engine too with --no-engine-process; with --api-server-count N, the busiest of
its HTTP processes, from dspark_api_server_cpu_seconds, and all of theirs in the JSON's
server_cpu_total): a client value near 1.0 means that client process was saturated; a server
value near 1.0 points at the server's Python work. JSON goes to --out, a markdown table to
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchlib import level_requests, requests_per_level, step_profile

from dspark_jax.__main__ import read_prompt_file


async def one_request(http: httpx.AsyncClient, args, prompt: str) -> dict:
    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "tpot": (end - first) / (tokens - 1) if first and tokens > 1 else None,
            "tokens": tokens}


async def closed_loop(http, args, prompts, concurrency: int, total: int, first: int = 0) -> list[dict]:
    order = iter(range(first, first + total))
    results = []

    async def worker():
        for i in order:
            results.append(await one_request(http, args, prompts[i % len(prompts)]))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return results


async def poisson(http, args, prompts, rate: float, total: int) -> list[dict]:
    rng = random.Random(0)
    tasks = []
    for i in range(total):
        tasks.append(asyncio.ensure_future(one_request(http, args, prompts[i % len(prompts)])))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


KEEPALIVE_SECONDS = 2.0


def connect(args) -> httpx.AsyncClient:
    """The load generator's HTTP client. A connection idle for 5 s is closed by uvicorn (as by
    vLLM's server); httpx keeps one for 5 s too, so a request sent on it just then can meet the
    close: idle ones are dropped sooner."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE_SECONDS)
    return httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits)


def ready() -> None:
    """A task that starts a load-generator process (and imports this script in it)."""


def share_of_closed_loop(args, prompts, concurrency: int, total: int, first: int) -> tuple[list[dict], float]:
    """One load-generator process's share of a closed loop, on its own event loop and
    connections (opened for each pass, so they start cold where one process keeps its own):
    its requests' timings and the CPU seconds it spent."""
    async def main():
        async with connect(args) as http:
            return await closed_loop(http, args, prompts, concurrency, total, first)

    cpu = time.process_time()
    results = asyncio.run(main())
    return results, time.process_time() - cpu


async def spread_closed_loop(pool, args, prompts, concurrency: int, total: int) -> tuple[list[dict], float, int]:
    """A closed loop split over the processes of `pool`, each keeping its share of the slots in
    flight with requests in proportion: every request's timings, the CPU seconds of the busiest
    process and the number of processes used."""
    n = min(args.client_processes, concurrency)  # each process with at least one slot
    slots = [concurrency * i // n for i in range(n + 1)]
    starts = [total * c // concurrency for c in slots]  # first request of each process
    loop = asyncio.get_running_loop()
    done = await asyncio.gather(*(loop.run_in_executor(pool, share_of_closed_loop, args, prompts,
                                                       slots[i + 1] - slots[i], starts[i + 1] - starts[i], starts[i])
                                  for i in range(n)))
    return [r for results, _ in done for r in results], max(cpu for _, cpu in done), n


COUNTERS = ("dspark_decode_rounds_total", "dspark_round_tokens_total", "dspark_engine_steps_total",
            "dspark_engine_step_seconds_total", "dspark_engine_wait_seconds_total", "dspark_engine_program_shapes",
            "process_cpu_seconds_total")


async def counters(http) -> tuple[dict, float]:
    """The server's `COUNTERS` so far (NaN for one it does not export: another server, or an
    older serve.py) and its programs compiling now (0 when it does not say), from its /metrics."""
    text = (await http.get("/metrics")).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    values = {s.name: s.value for s in samples}
    out = {name: values.get(name, math.nan) for name in COUNTERS}
    # serve.py --api-server-count N: each HTTP process's CPU seconds, by pid
    out["api_server_cpu"] = {s.labels["pid"]: s.value for s in samples if s.name == "dspark_api_server_cpu_seconds"}
    return out, values.get("dspark_engine_compiles_pending", 0.0)


def server_cpu_seconds(before: dict, after: dict) -> tuple[float, float]:
    """CPU seconds the server's HTTP process used between two `counters`; with several, the
    busiest's and all of theirs (one process: the same twice)."""
    if not after["api_server_cpu"]:
        cpu = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
        return cpu, cpu
    used = [cpu - before["api_server_cpu"].get(pid, 0.0) for pid, cpu in after["api_server_cpu"].items()]
    return max(used), sum(used)


async def settled(http, every: float = 10.0) -> dict:
    """`counters` once the server compiles nothing (its background compilations done), saying
    every `every` seconds how many it still waits for: a server started with --precompile (the
    default on a GPU) compiles every program shape its context allows, minutes for a 30-layer
    model, and a level is measured only after that."""
    start = said = time.perf_counter()
    while True:
        values, pending = await counters(http)
        if not pending:
            return values
        if time.perf_counter() - said >= every:
            said = time.perf_counter()
            print(f"waiting for the server's {pending:.0f} background compilations ({said - start:.0f} s so far; "
                  "a server started with --no-precompile has none)", flush=True)
        await asyncio.sleep(0.5)


async def measure(http, args, prompts, load: str, level: float, total: int, pool=None) -> dict:
    async def run() -> tuple[list[dict], float, int]:  # timings, CPU of the busiest other client process, processes
        if load != "concurrency":
            return await poisson(http, args, prompts, level, total), 0.0, 1
        if pool is None:
            return await closed_loop(http, args, prompts, int(level), total), 0.0, 1
        return await spread_closed_loop(pool, args, prompts, int(level), total)

    # warm-up: the server compiles the shapes this level meets; requests arrive at times that
    # vary from run to run, so a pass may meet shapes the one before did not: warm up until a
    # pass meets none (or --warmup-passes), then measure once the server compiles nothing
    passes, before = 0, await settled(http)
    while passes < args.warmup_passes:
        await run()
        passes += 1
        shapes, before = before["dspark_engine_program_shapes"], await settled(http)
        if before["dspark_engine_program_shapes"] == shapes or math.isnan(shapes):  # (NaN: the server does not say)
            break
    start, cpu = time.perf_counter(), time.process_time()
    results, elsewhere, processes = await run()
    seconds, cpu = time.perf_counter() - start, max(time.process_time() - cpu, elsewhere)
    after, _ = await counters(http)
    busiest, total = server_cpu_seconds(before, after)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    rounds = delta["dspark_decode_rounds_total"]
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")
    return {load: level, "requests": len(results), "seconds": seconds, "requests_per_s": len(results) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in results) / seconds,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "tokens_per_round": delta["dspark_round_tokens_total"] / rounds if rounds else float("nan"),
            **step_profile(delta["dspark_engine_steps_total"], delta["dspark_engine_step_seconds_total"], seconds,
                            delta["dspark_engine_wait_seconds_total"]),
            "new_program_shapes": delta["dspark_engine_program_shapes"], "warmup_passes": passes,
            "client_processes": processes,
            "client_cpu": cpu / seconds, "server_cpu": busiest / seconds, "server_cpu_total": total / seconds}


async def run(args) -> dict:
    prompts = read_prompt_file(args.prompts) if args.prompts else ["Write a story about a robot."]
    spread = args.client_processes > 1
    with (ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn")) if spread
          else contextlib.nullcontext()) as pool:
        if pool is not None:  # every process started (and this script imported there) before any timed pass
            await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(pool, ready)
                                   for _ in range(args.client_processes)))
        async with connect(args) as http:
            if args.model is None:
                args.model = (await http.get("/v1/models")).json()["data"][0]["id"]
            out = {"base_url": args.base_url, "model": args.model, "max_tokens": args.max_tokens, "rows": []}
            levels = [("request_rate", r) for r in args.request_rate] or [("concurrency", c) for c in args.concurrency]
            for (load, level), total in zip(levels, args.requests):
                row = await measure(http, args, prompts, load, level, total, pool)
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="the model name to send (default: the server's first)")
    p.add_argument("--api-key")
    p.add_argument("--prompts", help="a prompt file (default: one built-in prompt)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--request-rate", type=float, nargs="*", default=[],
                   help="Poisson arrivals at these rates (requests/s) instead of closed loops")
    p.add_argument("--num-prompts", type=int, nargs="+",
                   help="requests per level: one count, or one per level (default: max(4c, 16), or 8 per rate)")
    p.add_argument("--warmup-passes", type=int, default=3, help="most warm-up runs of a level's load")
    p.add_argument("--client-processes", type=int, default=1,
                   help="load-generator processes a closed loop is split over (each with its share of the requests "
                        "in flight), so that one client process does not cap a fast server")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="bench_serving.json")
    args = p.parse_args(argv)
    if args.client_processes < 1:
        p.error(f"--client-processes must be at least 1, got {args.client_processes}")
    if args.client_processes > 1 and args.request_rate:
        p.error("--client-processes splits closed loops (--concurrency), not --request-rate arrivals")
    try:
        args.requests = level_requests(args.num_prompts, args.request_rate or args.concurrency,
                                       (lambda rate: 8) if args.request_rate else requests_per_level)
    except ValueError as e:
        p.error(str(e))
    out = asyncio.run(run(args))
    print(f"\n{out['model']} at {out['base_url']}, {args.max_tokens} tokens per request")
    key = "request_rate" if args.request_rate else "concurrency"
    print(f"| {key} | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | tokens/round "
          "| step ms | waiting ms | stepping | new program shapes | client CPU | server CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r[key]:g} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.1f} | "
              f"{r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} | {r['tpot_p99_ms']:.2f} | {r['tokens_per_round']:.2f} "
              f"| {r['step_ms']:.2f} | {r['wait_ms']:.2f} | {r['stepping']:.0%} | {r['new_program_shapes']:.0f} | "
              f"{r['client_cpu']:.2f} | {r['server_cpu']:.2f} |")


if __name__ == "__main__":
    main()
