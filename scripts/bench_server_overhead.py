"""The HTTP server's overhead: serve.py against the in-process engine, at the same load.

    python scripts/bench_server_overhead.py --model smollm2 --prompts ../shared/data/eval/mt-bench.jsonl \\
        --concurrency 1 4 16 64 256
    python scripts/bench_server_overhead.py --model model.gguf --draft runs/dspark_smollm2/draft --prompts ...

Runs, one after the other and each in its own processes (so each has the device to itself):
1. `bench_engine.py`: the engine in process, autoregressive (`ar`), or with --draft the
   confidence scheduler over an SPS table it profiles (`sched`), or over --sps (an earlier
   bench_engine.py run's --out, say, which saves the profiling);
2. `serve.py` with the same engine settings and the same decoding (with --draft: `--scheduler
   prefix` over the table of step 1), and `bench_serving.py` against it; once for each
   --api-server-count (serve.py's HTTP processes), one server after the other.
Both see the same prompts, requests per level, tokens per request (EOS ignored), pages, rounds
per step, kernels (--kernels), slots (the largest concurrency) and prefill budget (2048 tokens
a step). The server
runs with --no-precompile, so that each compiles only the shapes its warm-up meets, and finds
the engine run's programs in their shared persistent compilation cache ($JAX_COMPILATION_CACHE_DIR,
else one under the run's log directory), so that it loads them rather than compiling them again.

Prints, per concurrency, both rows and the server's share of the engine's output tokens/s and
its TPOT p50 over the engine's (goal: within 10%), and where the difference lies: each engine's
mean wall time per step and the share of the level it spent stepping (a server engine that
steps as fast but less of the time waits between steps: for requests, or for the messages
of its process), and the CPU seconds per second of the level of the load generator's busiest
process and of the server's process (bench_serving.py says what each counts). `--no-engine-process` serves
from the engine in the HTTP process instead, which separates the process hop from the HTTP
layer. JSON (the runs and the ratios) goes to --out, rewritten after each server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from benchlib import level_requests, requests_per_level

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PREFILL_TOKENS = 2048  # bench_engine.py's engines take this many prefill tokens a step


def serve(args, flags: list[str], log_path: str, env: dict) -> subprocess.Popen:
    """serve.py with `flags`, once its /health answers."""
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *flags], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            with open(log_path) as f:
                sys.exit(f"serve.py exited with {server.returncode}:\n{f.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    sys.exit(f"serve.py did not answer /health in {args.startup_timeout} s (its log: {log_path})")


def compare(engine: dict, server: dict) -> list[dict]:
    """Per concurrency: both runs' throughput and TPOT p50, and the server's ratios to the engine's."""
    served = {r["concurrency"]: r for r in server["rows"]}
    rows = []
    for e in engine["rows"]:
        s = served.get(e["concurrency"])
        if s is None:
            continue
        rows.append({"concurrency": e["concurrency"],
                     "engine_tokens_per_s": e["tokens_per_s"], "server_tokens_per_s": s["tokens_per_s"],
                     "throughput_ratio": s["tokens_per_s"] / e["tokens_per_s"],
                     "engine_tpot_p50_ms": e["tpot_p50_ms"], "server_tpot_p50_ms": s["tpot_p50_ms"],
                     "tpot_ratio": s["tpot_p50_ms"] / e["tpot_p50_ms"],
                     "engine_ttft_p50_ms": e["ttft_p50_ms"], "server_ttft_p50_ms": s["ttft_p50_ms"],
                     "engine_step_ms": e["step_ms"], "server_step_ms": s["step_ms"],
                     "engine_stepping": e["stepping"], "server_stepping": s["stepping"],
                     "client_cpu": s.get("client_cpu", math.nan), "server_cpu": s.get("server_cpu", math.nan)})
    return rows


def write_out(args, engine: dict, servers: dict) -> list[dict]:
    """--out with the engine's run, the servers measured so far and their rows; returns the rows."""
    rows = [{"api_server_count": count, **row} for count, served in servers.items() for row in compare(engine, served)]
    with open(args.out, "w") as f:
        json.dump({"engine": engine, "servers": {str(count): served for count, served in servers.items()},
                   "engine_process": args.engine_process, "rows": rows}, f, indent=1)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the setup's download), a .gguf or a transformers dir")
    p.add_argument("--draft", help="a DeepSpec draft directory: both decode with the confidence scheduler")
    p.add_argument("--sps", help="with --draft: the SPS table both use (bench_engine.py's --sps), instead of "
                                 "profiling one; measure it with the same kernels, page size and rounds a step")
    p.add_argument("--prompts", required=True, help="a {\"turns\": [...]} prompt file (the server takes text)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, nargs="+",
                   help="requests per level: one count, or one per --concurrency level (default: max(4c, 16)); "
                        "more give steadier figures on a fast device")
    p.add_argument("--client-processes", type=int, default=1, help="bench_serving.py's load-generator processes")
    p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"],
                   help="both engines' kernels (serve.py's --kernels)")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--kv-memory", type=float, default=0.5, help="a fraction of free device memory, or bytes if > 1")
    p.add_argument("--num-scheduler-steps", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-server-count", type=int, nargs="+", default=[1],
                   help="serve.py's HTTP processes; several counts: a server for each, measured in turn")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="serve.py's engine in its own process (its default), or in the HTTP process's event loop")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default="bench_server_overhead.json")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_server_overhead_")
    engine_json = os.path.join(work, "engine.json")
    kv = repr(args.kv_memory) if args.kv_memory <= 1 else str(int(args.kv_memory))
    levels = [str(c) for c in args.concurrency]
    try:  # refused here, before either run starts
        level_requests(args.num_prompts, args.concurrency, requests_per_level)
    except ValueError as e:
        p.error(str(e))
    if args.sps and not args.draft:
        p.error("--sps needs --draft (it prices drafted rounds)")
    counts = args.api_server_count
    if min(counts) < 1 or len(set(counts)) < len(counts) or (max(counts) > 1 and not args.engine_process):
        p.error(f"--api-server-count must be distinct counts of at least 1 (1 with --no-engine-process), got {counts}")
    if args.client_processes < 1:
        p.error(f"--client-processes must be at least 1, got {args.client_processes}")
    per_level = [] if args.num_prompts is None else ["--num-prompts", *map(str, args.num_prompts)]
    # one persistent compilation cache for the engine run and the servers, which compile the same
    # programs: a server then loads them rather than compiling them again (JAX's own setting if set)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
           or os.path.join(work, "xla")}
    subprocess.run([sys.executable, os.path.join(HERE, "bench_engine.py"), "--target", args.model,
                    *(["--draft", args.draft] if args.draft else []),
                    *(["--sps", os.path.abspath(args.sps)] if args.sps else []), "--prompts", args.prompts,
                    "--modes", "sched" if args.draft else "ar", "--concurrency", *levels,
                    "--max-tokens", str(args.max_tokens), "--static-batch", "0", "--kv-memory", kv,
                    "--page-size", str(args.page_size), "--scheduler-steps", str(args.num_scheduler_steps),
                    "--dtype", args.dtype, "--kernels", args.kernels, *per_level, "--out", engine_json],
                   check=True, cwd=ROOT, env=env)

    flags = ([] if args.model == "smollm2" else ["--model", args.model]) + [
        "--dtype", args.dtype, "--page-size", str(args.page_size), "--kv-memory", kv,
        "--max-num-batched-tokens", str(PREFILL_TOKENS), "--max-num-seqs", str(max(args.concurrency)),
        "--num-scheduler-steps", str(args.num_scheduler_steps), "--kernels", args.kernels, "--no-precompile",
        "--port", str(args.port),
        "--engine-process" if args.engine_process else "--no-engine-process"]
    if args.draft:  # the engine run's SPS table (--sps's, or the one it profiled), with its draft seconds
        flags += ["--draft", args.draft, "--scheduler", "prefix", "--sps", engine_json]
    with open(engine_json) as f:
        engine = json.load(f)
    servers = {}
    for count in args.api_server_count:
        server_json = os.path.join(work, f"server{count}.json")
        server = serve(args, [*flags, "--api-server-count", str(count)], os.path.join(work, f"server{count}.log"), env)
        try:
            subprocess.run([sys.executable, os.path.join(HERE, "bench_serving.py"), "--base-url",
                            f"http://127.0.0.1:{args.port}", "--prompts", args.prompts, "--concurrency", *levels,
                            "--max-tokens", str(args.max_tokens), "--client-processes", str(args.client_processes),
                            *per_level, "--out", server_json], check=True, cwd=ROOT)
        finally:
            server.send_signal(signal.SIGTERM)  # drains, then exits
            server.wait(timeout=120)
        with open(server_json) as f:
            servers[count] = json.load(f)
        rows = write_out(args, engine, servers)  # after each server: a run cut short keeps what it measured

    print(f"\n{engine['device']}, {args.model}, {'DSpark + prefix scheduler' if args.draft else 'AR'}, server engine "
          f"{'in its own process' if args.engine_process else 'in the HTTP process'}, "
          f"{args.max_tokens} tokens per request (logs in {work})")
    print("| concurrency | HTTP processes | engine tokens/s | server tokens/s | server/engine | engine TPOT p50 ms | "
          "server TPOT p50 ms | server/engine | step ms engine / server | stepping engine / server | "
          "CPU client / server |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["api_server_count"])):
        print(f"| {r['concurrency']} | {r['api_server_count']} | {r['engine_tokens_per_s']:.0f} | "
              f"{r['server_tokens_per_s']:.0f} | {r['throughput_ratio']:.3f} | {r['engine_tpot_p50_ms']:.2f} | "
              f"{r['server_tpot_p50_ms']:.2f} | {r['tpot_ratio']:.3f} | "
              f"{r['engine_step_ms']:.2f} / {r['server_step_ms']:.2f} | "
              f"{r['engine_stepping']:.0%} / {r['server_stepping']:.0%} | "
              f"{r['client_cpu']:.2f} / {r['server_cpu']:.2f} |")


if __name__ == "__main__":
    main()
