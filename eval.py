"""Evaluates a draft model: acceptance, calibration, speed (`python eval.py --help`).

The command lives in dspark_jax/evaluation/cli.py (installed as `dspark-eval`); this file runs it from a checkout.
"""

import sys

from dspark_jax.evaluation.cli import cli, main  # noqa: F401  (main: the in-process entry tests call)

if __name__ == "__main__":
    sys.exit(cli())
