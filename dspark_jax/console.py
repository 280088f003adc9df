"""Logging setup shared by the command-line entry points (library modules only log)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """Timestamped progress lines on stdout (`[12:34:56] message`, beside the scripts' printed
    results) from this project's modules and the running script at `level`; other libraries'
    loggers stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for name in ("dspark_jax", "__main__"):
        logging.getLogger(name).setLevel(level)
