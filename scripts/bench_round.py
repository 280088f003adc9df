"""Device time of the engine's decoding round by kind: autoregressive, undrafted, drafted.

    python scripts/bench_round.py --preset qwen3-4b --rows 64 --context 480 --rounds 4

Runs the engine's round program (`dspark_jax.serving.step.engine_round`) directly, without
the host's planning, on random weights (`dspark_jax.serving.round_times.round_seconds`): every
one of `rows` rows running with `context` positions in its own pages. The three programs:
without a draft (AR), with a random DSpark draft that does not draft (what the engine launches
while drafting does not pay: the draft takes in the pending positions once, then the target
decodes alone) and with it drafting and verifying every draft token (the widest verify pass).
Prints milliseconds per round: (the fastest of 3 timings of 5 programs - the fastest of 3 of
1 program) / 4, so that the first launch's host work cancels (`round_seconds`).
"""

from __future__ import annotations

import argparse

import jax

from dspark_jax import Target
from dspark_jax.evaluation.evaluation import draft_from_spec
from dspark_jax.models.presets import preset
from dspark_jax.serving.round_times import round_seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--rows", type=int, default=64, help="running rows of the round program")
    p.add_argument("--context", type=int, default=480, help="positions each row holds")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="rounds per step (the engine's num_scheduler_steps)")
    p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
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


if __name__ == "__main__":
    main()
