"""`python serve.py` / `python -m dspark_jax serve`: the OpenAI-compatible server.

With no arguments it serves SmolLM2-135M-Instruct (fetched by the setup step), decoding
autoregressively, on http://127.0.0.1:8000/v1. With --draft it decodes speculatively; with
--scheduler prefix|async the confidence scheduler picks each round's verify lengths from an
SPS table (--sps FILE, or measured on this device at start-up with the draft's seconds per
pass, and cached under $DSPARK_CACHE/sps, default ~/.cache/dspark_jax/sps); with the draft's
cost in the table it also skips drafting in rounds where drafting does not pay. The engine
is built and stepped in a child process (`EngineProcess`) unless --no-engine-process.

With --api-server-count N > 1, N HTTP server processes share the port (uvicorn's workers:
it restarts one that dies, and on SIGTERM lets each drain) and the engine process: each
connects to it (`EngineClient`) and gets its own requests' outputs, so the per-token work of
the HTTP layer (detokenizing, JSON, socket writes) spreads over N cores. /metrics then adds
up the processes' request metrics (prometheus_client's multiprocess mode) and shows each
one's CPU seconds in dspark_api_server_cpu_seconds{pid=...}.

If the engine fails (a step raises, or its process dies), the server stops and exits with 1,
as vLLM's does, so that whatever supervises it restarts it: the device state is lost, and a
server that stayed up would only answer 503.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys

from dspark_jax.console import HelpFormatter, configure_logging, run_cli

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
API_SERVER_ENV = "DSPARK_API_SERVER"  # how --api-server-count's processes find the engine (JSON)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="transformers directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="a DeepSpec draft directory: speculative decoding (default: autoregressive)")
    p.add_argument("--scheduler", default="none", choices=["none", "prefix", "async"],
                   help="with --draft: how many draft tokens each round verifies (none: all of them)")
    p.add_argument("--sps", help="with --scheduler: an SPS table (python -m dspark_jax profile-sps); "
                                 "default: measured at start-up and cached")
    p.add_argument("--tensor-parallel", type=int, default=1, help="devices to split the model over")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    p.add_argument("--kv-memory", type=float, default=None,
                   help="KV pages' budget: a fraction of free device memory (<= 1) or bytes "
                        "(default: 0.8 of free accelerator memory, 1 GiB on CPU)")
    p.add_argument("--page-size", type=int, default=16, help="positions per KV page")
    p.add_argument("--max-model-len", type=int, help="prompt plus answer tokens (default: the model's context)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill tokens per step")
    p.add_argument("--max-waiting", type=int, default=4096, help="queued requests before 503s")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in its own process (the HTTP layer's Python work then never delays "
                        "an engine step)")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="HTTP server processes sharing the port and the engine process: more spread the HTTP "
                        "layer's per-token work over cores (worth it when /metrics' CPU of one nears a core)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="plan each engine step while the previous one runs on the device")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decoding rounds per engine step: more share the host's work per step (faster for "
                        "small models) but a new request waits for the step in flight")
    p.add_argument("--kernels", choices=["auto", "pallas", "xla"], default="auto",
                   help="paged attention, draft sampling and verification: XLA, or the Pallas kernels (one "
                        "device; interpreted off a GPU or TPU); auto: the kernels on one GPU, else XLA")
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the engine's largest program shapes at start-up, in the background, so that no "
                        "step waits for a compilation (default: on, except on a CPU)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep the engine's compiled programs in DIR, so that a restart or a second server with "
                        "the same model and flags loads them instead of compiling them (JAX's persistent "
                        "compilation cache, which keeps programs that took a second or more to compile; default: "
                        "$JAX_COMPILATION_CACHE_DIR if set, else $DSPARK_CACHE/xla; 'off' to disable)")
    p.add_argument("--seed", type=int, default=0, help="seeds of requests that send none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DSPARK_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1 (default: $DSPARK_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: from --model)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="on SIGTERM, seconds to let requests in flight finish (default: as long as they take)")


def check_serve_args(args) -> None:
    """Rejects inconsistent flags before any model loads."""
    if args.scheduler != "none" and not args.draft:
        raise ValueError("--scheduler needs --draft")
    if args.sps and args.scheduler == "none":
        raise ValueError("--sps needs --scheduler prefix or async")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1 and not args.engine_process:
        raise ValueError("--api-server-count > 1 needs the engine in its own process (drop --no-engine-process)")
    if args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    if args.kv_memory is not None and args.kv_memory <= 0:
        raise ValueError(f"--kv-memory must be > 0, got {args.kv_memory}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")


def build_engine(args):
    """(Engine, tokenizer, served model name) from the parsed flags."""
    import jax

    from dspark_jax.checkpoints.deepspec import load_draft
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.checkpoints.target import load_target
    from dspark_jax.evaluation.calibration import load_sts
    from dspark_jax.serving import Engine
    from dspark_jax.sharding import make_mesh

    use_compilation_cache(args.compilation_cache)
    mesh = None
    if args.tensor_parallel > 1:
        devices = jax.devices()
        if len(devices) < args.tensor_parallel:
            raise ValueError(f"--tensor-parallel {args.tensor_parallel}: only {len(devices)} devices")
        mesh = make_mesh(tensor=args.tensor_parallel, devices=devices[: args.tensor_parallel])
    path = args.model or smollm2_gguf()
    log.info("loading %s (%s)", path, args.dtype)
    target = load_target(path, dtype=args.dtype, mesh=mesh)
    draft = load_draft(args.draft, target=target, dtype=args.dtype, mesh=mesh) if args.draft else None
    scheduler = None
    if args.scheduler != "none":
        scheduler = make_scheduler(args, target, draft, load_sts(args.draft), mesh)
    kv = None if args.kv_memory is None else (args.kv_memory if args.kv_memory <= 1 else int(args.kv_memory))
    engine = Engine(target, draft, scheduler=scheduler, max_num_seqs=args.max_num_seqs, page_size=args.page_size,
                    kv_memory=kv, max_model_len=args.max_model_len,
                    max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting, seed=args.seed,
                    mesh=mesh, async_scheduling=args.async_scheduling, num_scheduler_steps=args.num_scheduler_steps,
                    kernels=args.kernels)
    if args.precompile if args.precompile is not None else jax.default_backend() != "cpu":
        engine.precompile()
    name = args.served_model_name or (DEFAULT_MODEL_NAME if args.model is None else
                                      os.path.basename(os.path.normpath(path)).removesuffix(".gguf"))
    return engine, target.tokenizer, name


def use_compilation_cache(directory: str | None) -> None:
    """Turns on JAX's persistent compilation cache in `directory` (None: the JAX setting
    if one is made, else $DSPARK_CACHE/xla; "off": none). A server's programs take seconds
    each to compile on a GPU; cached, a restart loads them instead."""
    import jax

    from dspark_jax.checkpoints.smollm2 import cache_dir

    if directory == "off":
        return
    if directory is None:
        directory = jax.config.jax_compilation_cache_dir or os.path.join(cache_dir(), "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    log.info("compiled programs cached in %s", directory)


def make_scheduler(args, target, draft, temperatures, mesh=None):
    """The confidence scheduler over --sps, or over a table measured now for this engine's
    settings, calibrated to its rounds (`serving.round_times`; cached)."""
    import jax

    from dspark_jax.checkpoints.smollm2 import cache_dir
    from dspark_jax.decoding.scheduler import scheduler_from_table
    from dspark_jax.evaluation.sps import load_table, save_table
    from dspark_jax.serving.round_times import engine_table

    gamma = draft.config.block_size
    if args.sps:
        table = load_table(args.sps)
        if not table.get("draft_seconds"):
            log.info("%s has no draft_seconds: every round drafts", args.sps)
    else:
        context = min(1024, target.config.max_position_embeddings // 2)
        levels = sorted({min(c, args.max_num_seqs) for c in (1, 4, 16, 64, 256)})
        key = json.dumps(["sps by rows, engine rounds", jax.devices()[0].device_kind,
                          os.path.abspath(args.model or "smollm2"), os.path.abspath(args.draft), args.dtype, gamma,
                          levels, context, args.tensor_parallel, args.num_scheduler_steps, args.page_size,
                          args.kernels])
        path = os.path.join(cache_dir(), "sps", hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
        if os.path.exists(path):
            table = load_table(path)
            log.info("SPS table from %s", path)
        else:
            log.info("measuring verify steps/s and the engine's rounds at concurrency %s (once; cached in %s)",
                     levels, path)
            table = {"device": jax.devices()[0].device_kind, "concurrency": levels, "context": context,
                     "gamma": gamma, **engine_table(target, draft, levels, context,
                                                    num_rounds=args.num_scheduler_steps, page_size=args.page_size,
                                                    kernels=args.kernels, mesh=mesh)}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_table(table, path)
    return scheduler_from_table(args.scheduler, table, temperatures)


def run(args) -> int:
    check_serve_args(args)
    return serve(functools.partial(build_engine, args), host=args.host, port=args.port, api_key=args.api_key,
                 api_server_count=args.api_server_count, engine_process=args.engine_process,
                 drain_timeout=args.drain_timeout)


def serve(build, *, host: str, port: int, api_key: str | None = None, api_server_count: int = 1,
          engine_process: bool = True, drain_timeout: float | None = None) -> int:
    """Serves the engine `build()` returns (with its tokenizer and model name; a picklable
    callable) on host:port until SIGTERM or SIGINT: in a child process unless not
    `engine_process`, with `api_server_count` HTTP processes (module docstring). Returns the
    exit code: 0 after SIGINT, 1 if the engine failed or an HTTP process could not start, and
    uvicorn's start-up failure code if the app could not start."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from dspark_jax.serving import AsyncEngine, EngineProcess
    from dspark_jax.serving.engine import freeze_heap
    from dspark_jax.serving.openai_server import build_app

    if api_server_count > 1:
        return run_api_servers(build, host=host, port=port, api_key=api_key, count=api_server_count,
                               drain_timeout=drain_timeout)
    if engine_process:
        engine = EngineProcess(build)
        tokenizer, name = engine.tokenizer, engine.model_name
    else:
        local, tokenizer, name = build()
        engine = AsyncEngine(local)
    app = build_app(engine, tokenizer, name, api_key=api_key)
    freeze_heap()  # this process's (the engine's too without --engine-process)
    log.info("serving %s on http://%s:%d/v1%s", name, host, port, " (API key required)" if api_key else "")
    # uvicorn's SIGTERM/SIGINT handling is the drain: it stops accepting, lets the requests in
    # flight finish, then runs the app's shutdown (which stops the engine).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=drain_timeout))
    engine.on_failure = lambda error: setattr(server, "should_exit", True)  # the same drain, then exit 1
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises SIGINT again once it has drained (as uvicorn.run, an exit 0)
        pass
    if engine.failed:
        log.error("the engine failed (%s); the server stopped", engine.failure)
        return 1
    return 0 if server.started else STARTUP_FAILURE  # (uvicorn has said why)


def run_api_servers(build, *, host: str, port: int, api_key: str | None, count: int,
                    drain_timeout: float | None) -> int:
    """`count` HTTP processes over one engine process (module docstring): the engine process,
    then uvicorn's workers, each building its app with `api_server_app`; once they have
    drained and exited, the engine stops. An HTTP process that cannot start makes uvicorn stop
    them all (rather than restart it for ever); it leaves its reason in the shared directory,
    and this returns 1. If the engine process ends while serving, a thread here stops uvicorn's
    supervisor (which stops the HTTP processes), and this returns 1."""
    import asyncio
    import glob
    import shutil
    import tempfile
    import threading
    from multiprocessing.connection import wait

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from dspark_jax.serving import EngineProcess

    engine = EngineProcess(build, clients=True)
    shared = tempfile.mkdtemp(prefix="dspark-serve-")
    # read by the workers' prometheus_client when it is imported: every process's metrics in files there
    env = {"PROMETHEUS_MULTIPROC_DIR": os.path.join(shared, "metrics"),
           API_SERVER_ENV: json.dumps({"address": engine.address, "authkey": engine.authkey.hex(),
                                       "api_key": api_key, "shared": shared})}
    os.mkdir(env["PROMETHEUS_MULTIPROC_DIR"])
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    log.info("serving %s on http://%s:%d/v1 from %d processes%s", engine.model_name, host, port, count,
             " (API key required)" if api_key else "")
    try:
        # what uvicorn.run does with workers, with the supervisor at hand for the engine's watch
        config = uvicorn.Config(f"{__name__}:api_server_app", factory=True, workers=count, host=host, port=port,
                                log_level="warning", access_log=False, timeout_graceful_shutdown=drain_timeout)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])

        def watch_engine() -> None:  # (after a normal stop too, when it changes nothing)
            wait([engine.sentinel])
            supervisor.should_exit.set()

        threading.Thread(target=watch_engine, name="engine-watch", daemon=True).start()
        try:
            supervisor.run()
        except KeyboardInterrupt:  # (as uvicorn.run)
            pass
        failures = []
        if engine.exitcode is not None:
            failures.append(f"the engine process ended while serving (exit code {engine.exitcode}); "
                            "the HTTP processes were stopped")
        for path in sorted(glob.glob(os.path.join(shared, "failed-*"))):
            with open(path) as f:
                failures.append(f.read())
    finally:
        asyncio.run(engine.shutdown())
        shutil.rmtree(shared, ignore_errors=True)
        for key, value in saved.items():  # this process's environment as it was
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for failure in failures:
        log.error("%s", failure)
    return 1 if failures else 0


def api_server_app():
    """The app of one of --api-server-count's processes (uvicorn calls it in each): a client
    of the engine process that `run_api_servers` started, with request ids of its own. If it
    cannot connect, it says why in the shared directory and exits with uvicorn's start-up
    failure code, on which uvicorn stops every process instead of restarting this one."""
    import signal

    from uvicorn.config import STARTUP_FAILURE

    from dspark_jax.serving import EngineClient
    from dspark_jax.serving.engine import freeze_heap
    from dspark_jax.serving.openai_server import build_app

    configure_logging()
    settings = json.loads(os.environ[API_SERVER_ENV])
    try:
        engine = EngineClient.connect(settings["address"], bytes.fromhex(settings["authkey"]), f"api{os.getpid()}")
    except Exception as error:
        with open(os.path.join(settings["shared"], f"failed-{os.getpid()}"), "w") as f:
            f.write(f"HTTP process {os.getpid()} could not connect to the engine process at {settings['address']}: "
                    f"{error!r}")
        sys.exit(STARTUP_FAILURE)
    # its connection lost: uvicorn drains this process and starts another, which connects again (or,
    # the engine process gone, cannot, and then uvicorn stops them all)
    engine.on_failure = lambda error: os.kill(os.getpid(), signal.SIGTERM)
    app = build_app(engine, engine.tokenizer, engine.model_name, api_key=settings["api_key"])
    freeze_heap()
    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="serve.py", description=__doc__, formatter_class=HelpFormatter)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    configure_logging()
    return run(args)


def cli(argv=None) -> int:
    return run_cli(main, argv)
