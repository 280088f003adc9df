"""Trains a draft model: `python train.py --config configs/<recipe>.py [--set key=value ...]`.

The command lives in dspark_jax/training/cli.py (installed as `dspark-train`); this file runs it from a checkout.
"""

import sys

from dspark_jax.training.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
