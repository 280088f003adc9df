"""Device time of one engine step by kind of round: autoregressive, undrafted, drafted.

    python scripts/bench_round.py --preset qwen3-4b --capacity 64 --table-pages 16 --rounds 4

Runs the engine's round program (`dspark_jax.serving.step.engine_round`) directly, without
the host's planning, on random weights: every one of `capacity` rows running, each with its
own `table-pages` pages (attention reads the whole table, so the rows' lengths do not change
the cost). The three programs: without a draft (AR), with a random DSpark draft that does not
draft (what the engine launches while drafting does not pay: the draft takes in the pending
positions once, then the target decodes alone) and with it drafting (the prefix scheduler
picks verify lengths). Prints the compile time, and the median and minimum of 20 timed steps
after a first call.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from dspark_jax import Target
from dspark_jax.decoding.scheduler import PrefixScheduler
from dspark_jax.evaluation.evaluation import draft_from_spec
from dspark_jax.models.presets import preset
from dspark_jax.serving import Engine
from dspark_jax.serving.step import engine_round


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--capacity", type=int, default=64, help="rows of the round program")
    p.add_argument("--table-pages", type=int, default=16, help="block-table width of every row")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="rounds per step (the engine's num_scheduler_steps)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)

    target = Target.random(preset(args.preset), dtype=args.dtype)
    draft = draft_from_spec("random:dspark", target, args.dtype)
    # a flat SPS table; the draft's cost only decides when the engine drafts, not what a program does
    scheduler = PrefixScheduler(tuple([500.0] * 512), draft_seconds=(1e-3,))
    cap, width = args.capacity, args.table_pages
    table = (1 + np.arange(cap * width, dtype=np.int32)).reshape(cap, width)  # page 0 is the scratch page
    running = np.ones((cap,), bool)
    print(f"{jax.devices()[0].device_kind}, {args.preset}, {cap} rows, {width} pages of {args.page_size} each, "
          f"{args.rounds} rounds per step\n")
    print("| program | compile s | step ms (median) | step ms (min) | ms per round |\n|---|---|---|---|---|")
    for name, d, s, drafting in (("autoregressive", None, None, True), ("undrafted", draft, scheduler, False),
                                 ("drafted", draft, scheduler, True)):
        engine = Engine(target, d, scheduler=s, max_num_seqs=cap, page_size=args.page_size,
                        num_pages=cap * width + 1, num_scheduler_steps=args.rounds)
        weights = (target.params, None if d is None else d.params)
        state = engine.state
        state = state._replace(done=state.done & False, max_new=state.max_new + 2**30)  # every row decodes throughout
        start = time.perf_counter()
        step = engine_round.lower(target.model, None if d is None else d.model, s, *weights, state, table, running,
                                  args.rounds, drafting).compile()
        compile_s = time.perf_counter() - start
        state = jax.block_until_ready(step(*weights, state, table, running)[0])
        times = []
        for _ in range(20):
            start = time.perf_counter()
            state = jax.block_until_ready(step(*weights, state, table, running)[0])
            times.append(time.perf_counter() - start)
        median = 1e3 * float(np.median(times))
        print(f"| {name} | {compile_s:.1f} | {median:.2f} | {1e3 * min(times):.2f} | {median / args.rounds:.2f} |")
        del engine, state, step


if __name__ == "__main__":
    main()
