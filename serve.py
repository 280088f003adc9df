"""Serves a model over the OpenAI API: `python serve.py [--model ...] [--draft ...]` (`--help`).

The command lives in dspark_jax/serving/cli.py (also `python -m dspark_jax serve`); this file runs it from a checkout.
"""

import sys

from dspark_jax.serving.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
