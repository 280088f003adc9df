"""Trains a draft model: `python train.py --config configs/<recipe>.py [--set key=value ...]` (or `dspark-train`).

Writes <output_dir>/metrics.jsonl, TensorBoard events, orbax checkpoints (a rerun resumes from
the latest) and the DeepSpec-format draft in <output_dir>/draft. With --prepare-cache it only
writes the recipe's offline target cache (cache_dir) and exits. Multi-host: set the usual
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or run under SLURM or on a TPU
pod) and pass --distributed.
"""

from __future__ import annotations

import argparse
import os
import signal

import jax

from dspark_jax.console import HelpFormatter, configure_logging, run_cli

# The recipes live beside the package in the repository, so the default works from any directory.
DEMO_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "demo_tiny.py")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default=DEMO_RECIPE, help="recipe file (the default is the CPU demo)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys")
    parser.add_argument("--prepare-cache", action="store_true", help="write the offline target cache and exit")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    args = parser.parse_args(argv)
    configure_logging()
    if args.distributed:
        jax.distributed.initialize()

    from dspark_jax.training.config import load_config
    from dspark_jax.training.trainer import prepare_cache, train

    config = load_config(args.config, args.set)
    if args.prepare_cache:
        if jax.process_index() == 0:  # one writer; the other hosts read the cache when training
            prepare_cache(config)
        return 0
    run = train(config)
    if run.stopped_by:  # checkpointed; the same command resumes
        return 128 + signal.Signals[run.stopped_by].value
    print(f"trained {run.total_steps} steps; draft in {config.output_dir}/draft, metrics in "
          f"{config.output_dir}/metrics.jsonl")
    return 0


def cli(argv=None) -> int:
    """`python train.py` / `dspark-train`: main() under the one-line error convention."""
    return run_cli(main, argv)
