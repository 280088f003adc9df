"""Device time of the engine's decoding round by kind: autoregressive, undrafted, drafted.

    python scripts/bench_round.py --preset qwen3-4b --rows 64 --context 480 --rounds 4

Runs the engine's round program (`dspark_jax.serving.step.engine_round`) directly, without
the host's planning, on random weights (`dspark_jax.serving.round_times.round_seconds`): every
one of `rows` rows running with `context` positions in its own pages. The three programs:
without a draft (AR), with a random DSpark draft that does not draft (what the engine launches
while drafting does not pay: the target decodes alone, and the draft takes in the pending
positions when they could overflow) and with it drafting and verifying every draft token (the
widest verify pass).
Prints milliseconds per round: (the fastest of 3 timings of 5 programs - the fastest of 3 of
1 program) / 4, so that the first launch's host work cancels (`round_seconds`). The undrafted
program takes the draft's pending positions in as the engine does, only when they could
overflow.

With --profile (a CUDA machine with torch beside jax: `benchlib.kernel_times`), also each
program's kernels (the undrafted one in each form the engine runs: with and without the pass
that takes the pending positions in first): GPU milliseconds and launches per program, and the
median wall time of one program launched and waited for, which adds the host's launch to the
device's work. Without the pass, the programs in a row overflow the pending buffer after a
few; its writes are then dropped, by the same kernels.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from dspark_jax import Target
from dspark_jax.evaluation.evaluation import draft_from_spec
from dspark_jax.models.presets import preset
from dspark_jax.serving.round_times import RoundPrograms, round_seconds
from dspark_jax.serving.step import must_flush


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--rows", type=int, default=64, help="running rows of the round program")
    p.add_argument("--context", type=int, default=480, help="positions each row holds")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="rounds per step (the engine's num_scheduler_steps)")
    p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--profile", action="store_true", help="also each program's kernels (needs CUDA and torch)")
    p.add_argument("--programs", type=int, default=10, help="programs each profile covers")
    args = p.parse_args(argv)

    target = Target.random(preset(args.preset), dtype=args.dtype)
    draft = draft_from_spec("random:dspark", target, args.dtype)
    print(f"{jax.devices()[0].device_kind}, {args.preset}, {args.rows} rows of {args.context} positions, "
          f"pages of {args.page_size}, {args.rounds} rounds per step, kernels {args.kernels}\n")
    print("| program | ms per round |\n|---|---|")
    for name, d, drafting in (("autoregressive", None, True), ("undrafted (random DSpark)", draft, False),
                              ("drafted, every draft token verified", draft, True)):
        seconds = round_seconds(target, d, rows=args.rows, context=args.context, drafting=drafting,
                                num_rounds=args.rounds, page_size=args.page_size, kernels=args.kernels)
        print(f"| {name} | {1e3 * seconds:.2f} |")
    if args.profile:
        settings = dict(rows=args.rows, context=args.context, num_rounds=args.rounds, page_size=args.page_size,
                        kernels=args.kernels, programs=1 + args.programs)
        width = draft.config.block_size + 1
        flushes = sorted({must_flush([bound], args.rounds, width) for bound in (width, 1)}, reverse=True)
        print("\n| program | kernel ms per program | kernels per program | ms a program alone, launch included |"
              "\n|---|---|---|---|")
        undrafted = [(f"undrafted, {'with' if f else 'without'} the pass over the pending positions first", draft,
                      False, f) for f in flushes]
        for name, d, drafting, flush in [("autoregressive", None, True, False), *undrafted,
                                         ("drafted, every draft token verified", draft, True, False)]:
            ms, launches, alone = profile(RoundPrograms(target, d, drafting=drafting, **settings), flush,
                                          args.programs)
            print(f"| {name} | {ms:.3f} | {launches:.0f} | {alone:.3f} |")


def profile(programs: RoundPrograms, flush: bool, count: int) -> tuple[float, float, float]:
    """(GPU kernel ms, kernel launches, median ms of one program launched and waited for) per
    program, over `count` programs each (after a first, compiling one)."""
    from benchlib import kernel_times

    def run():
        programs.launch(flush)
        jax.block_until_ready(programs.state)

    programs.reset()
    times = kernel_times(run, count)
    programs.reset()
    walls = []
    for _ in range(count):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    return (sum(ms for ms, _ in times.values()), sum(n for _, n in times.values()), 1e3 * float(np.median(walls)))


if __name__ == "__main__":
    main()
