"""Cost of DSpark's sequential heads: DSpark vs DFlash draft steps, against a full round.

    python scripts/bench_draft.py --preset qwen3-4b --batch 128 --block-sizes 4 8 12 16 --kernels xla pallas

For each block size gamma, on random bf16 weights of the released recipe shapes (5 draft
layers over the target's layers [1, 9, 17, 25, 33] for Qwen3-4B):
- draft step: `Draft.propose` (append gamma + 1 verified feature rows to the draft cache, the
  parallel block pass, then sampling at T = 1: DSpark's Markov + confidence scan, or DFlash's
  independent slots);
- verify step: the target's `Target.extend` of gamma + 1 tokens per sequence;
each timed as 8 steps of one jitted loop, every step against the same `--context`. The
sequential heads' overhead is the DSpark-minus-DFlash draft time, reported in ms and as a
share of a DSpark round (draft + verify). `--kernels pallas` samples the slots of both
drafters through the fused kernel of `pallas_kernels.markov_sampling` (their attention, over
a contiguous cache, stays XLA's).
"""

from __future__ import annotations

import argparse
import json
import logging

import jax

from dspark_jax import Draft, Target
from dspark_jax.sampling import SamplingParams
from dspark_jax.console import configure_logging
from dspark_jax.decoding.speculative import KERNELS, use_kernels
from dspark_jax.evaluation.step_times import draft_seconds, verify_seconds
from dspark_jax.models.draft_config import draft_config_for_target, spread_layer_ids
from dspark_jax.models.presets import preset

logger = logging.getLogger(__name__)

STEPS = 8  # steps per timed program


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-4b")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--kernels", nargs="+", default=["xla"], choices=KERNELS,
                        help="the drafters' sampling: XLA, or the fused Pallas kernel")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    target_config = preset(args.preset)
    target = Target.random(target_config, dtype="bfloat16")
    b, ctx = args.batch, args.context
    sampling = SamplingParams(temperature=1.0)
    rows = []
    for gamma in args.block_sizes:
        q = gamma + 1  # verified rows per round after a full acceptance
        logger.info(f"gamma {gamma} verify step")
        verify = verify_seconds(target, batch=b, tokens=q, context=ctx, capacity=ctx + q + 8, steps=STEPS)
        for kernels in args.kernels:
            times = {}
            for algorithm in ("dspark", "dflash"):
                config = draft_config_for_target(target_config, algorithm, spread_layer_ids(target_config.num_layers),
                                                 block_size=gamma, mask_token_id=target_config.vocab_size - 1)
                _, draft = use_kernels(target, Draft.random(config, target=target, seed=1), kernels)
                logger.info(f"gamma {gamma} {algorithm} draft step, kernels {kernels}")
                times[algorithm] = draft_seconds(draft, batch=b, context=ctx, capacity=ctx + q + 8,
                                                 sampling=sampling, steps=STEPS)
            overhead = times["dspark"] - times["dflash"]
            rows.append(dict(gamma=gamma, kernels=kernels, batch=b, context=ctx, dspark_draft_ms=times["dspark"] * 1e3,
                             dflash_draft_ms=times["dflash"] * 1e3, verify_ms=verify * 1e3,
                             overhead_ms=overhead * 1e3, overhead_of_round=overhead / (times["dspark"] + verify)))
            logger.info(f"gamma {gamma}: " + json.dumps(rows[-1]))  # each row as soon as it is measured
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)

    print(f"\n{args.preset} target, batch {b}, context {ctx}, device {jax.devices()[0].device_kind}")
    print(f"{'gamma':>5} {'kernels':>7} {'DSpark draft ms':>16} {'DFlash draft ms':>16} {'verify ms':>10} "
          f"{'heads ms':>9} {'of round':>9}")
    for r in rows:
        print(f"{r['gamma']:>5} {r['kernels']:>7} {r['dspark_draft_ms']:>16.3f} {r['dflash_draft_ms']:>16.3f} "
              f"{r['verify_ms']:>10.3f} {r['overhead_ms']:>9.3f} {r['overhead_of_round']:>8.2%}")


if __name__ == "__main__":
    main()
