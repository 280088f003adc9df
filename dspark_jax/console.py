"""Shared by the command-line entry points: logging setup and the error convention
(library modules only log and raise)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

# Expected failures: bad input, a missing file, a wrong config key. Their message is the
# whole story, so an entry point prints it on one line; anything else is a bug and keeps
# its traceback.
EXPECTED_ERRORS = (ValueError, OSError, KeyError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default and keeps a docstring description's layout."""


def add_sampling_args(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float,
                      top_p: float = 1.0, top_k: int = 0) -> None:
    """--max-new-tokens, --temperature (0 = greedy), --top-p (1 = off) and --top-k (0 = off)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=top_p, help="1 = off")
    parser.add_argument("--top-k", type=int, default=top_k, help="0 = off")


def configure_logging(level: int = logging.INFO) -> None:
    """Timestamped progress lines on stdout (`[12:34:56] message`, beside the scripts' printed
    results) from this project's modules and the running script at `level`; other libraries'
    loggers stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for name in ("dspark_jax", "__main__"):
        logging.getLogger(name).setLevel(level)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """`--debug` among the arguments or DSPARK_DEBUG=1 in the environment."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("DSPARK_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)` and returns its exit code (None counts as 0). An expected failure
    (ValueError and its subclasses, OSError, KeyError) prints one line `error: <message>` on
    stderr and returns 1; with `--debug` or DSPARK_DEBUG=1 it is re-raised, traceback and all.
    `--debug` is taken out of argv before `main` sees it."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    try:
        code = main(args)
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        message = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.filename and str(e.filename) not in str(message):
            message = f"{e.filename}: {e.strerror or e}"
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines) or type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)
