"""Profiled verify-step throughput SPS(B): target steps per second at B verify tokens.

The scheduler needs the target's cost of one verify step as a function of the total number
of tokens B it checks across the batch. `profile_sps` measures it on the current device for
a given concurrency R (R sequences against a cache of `context` positions each): it times
`Target.extend` with q = 1..gamma+1 tokens per sequence, so B = R * q, and interpolates
linearly in B between those points. Tables are saved as JSON
{"device", "concurrency", "context", "gamma", "measured": {B: steps/s}, "sps": [SPS(1), ...]}.

A serving engine's table (`profile_serving_sps`) is measured at several concurrencies, one
curve per row count ({"sps_rows": [c, ...], "sps": [[SPS at w = 1..gamma + 1 tokens per row],
...]}; `decoding.scheduler` reads it for the rows a round has), and may carry the draft's
seconds per pass by row count ("draft_seconds", `profile_draft_seconds`), so that its
scheduler can also skip drafting when drafting does not pay. The engine's own table
(`serving.round_times.engine_table`) calibrates those passes to its measured rounds.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from dspark_jax.decoding.scheduler import check_table
from dspark_jax.evaluation.step_times import draft_seconds, verify_seconds
from dspark_jax.sampling import SamplingParams


def no_more_than_larger(seconds, axis: int = 0) -> np.ndarray:
    """Each of `seconds` lowered to the smallest at a larger index along `axis` (a pass of more
    rows or tokens can always run a smaller one padded), so one slow sample cannot price a small
    pass above a large one."""
    return np.flip(np.minimum.accumulate(np.flip(np.asarray(seconds, float), axis), axis=axis), axis)


def interpolate(measured: dict[int, float], max_tokens: int) -> list[float]:
    """SPS(B) for B = 1..max_tokens, linear between measured B, flat outside them. A measured
    rate below that of a larger B is raised to it (a pass of B tokens can always run padded
    to the larger one), so one slow sample cannot price a small pass above a large one."""
    xs = np.asarray(sorted(measured), float)
    ys = np.maximum.accumulate(np.asarray([measured[int(x)] for x in xs], float)[::-1])[::-1]
    return np.interp(np.arange(1, max_tokens + 1), xs, ys).tolist()


def profile_sps(target, *, concurrency: int, context: int, gamma: int, steps: int = 8, reps: int = 5) -> dict:
    """Measures verify steps/s for q = 1..gamma+1 tokens per sequence (see the module doc)."""
    r = concurrency
    capacity = context + gamma + 2  # what a verify step of up to gamma + 1 tokens needs
    measured = {r * q: 1.0 / verify_seconds(target, batch=r, tokens=q, context=context, capacity=capacity,
                                            steps=steps, reps=reps)
                for q in range(1, gamma + 2)}
    return {
        "device": jax.devices()[0].device_kind,
        "concurrency": r,
        "context": context,
        "gamma": gamma,
        "measured": {str(b): v for b, v in measured.items()},
        "sps": interpolate(measured, r * (gamma + 1)),
    }


def profile_serving_sps(target, gamma: int, concurrencies, context: int) -> dict:
    """A serving engine's table: verify steps/s of c rows verifying w tokens each, for every
    concurrency c and w = 1..gamma + 1, measured at the widths the engine runs (powers of two up
    to gamma + 1) and linear in seconds between them. A pass's seconds are lowered to those of
    any wider pass or any pass of more rows (it can always run padded to one), so one slow
    sample cannot price a small pass above a large one. Returns {"sps_rows", "sps"} (module doc)."""
    widths = sorted({min(1 << i, gamma + 1) for i in range((gamma + 1).bit_length() + 1)})
    rows = sorted(set(concurrencies))
    seconds = np.asarray([[verify_seconds(target, batch=c, tokens=q, context=context, capacity=context + gamma + 2,
                                          steps=8, reps=3) for q in widths] for c in rows])  # [C, widths]
    seconds = no_more_than_larger(no_more_than_larger(seconds, axis=1), axis=0)
    every = np.stack([np.interp(np.arange(1, gamma + 2), widths, s) for s in seconds])  # [C, gamma + 1]
    return {"sps_rows": rows, "sps": (1.0 / every).tolist()}


def profile_draft_seconds(draft, concurrencies, context: int) -> tuple[float, ...]:
    """Seconds of the draft's pass (`Draft.propose`, sampling at temperature 1) over r rows,
    for r = 1..max(c): measured at every concurrency c, interpolated in r. With the SPS table
    it lets a scheduler decide whether drafting pays (`speculation_pays`)."""
    gamma = draft.config.block_size
    measured = {c: draft_seconds(draft, batch=c, context=context, capacity=context + gamma + 2,
                                 sampling=SamplingParams.rows(c), steps=8, reps=3) for c in concurrencies}
    xs = sorted(measured)
    # r rows cost at most what more rows do (a slow first sample is lowered to the next one)
    seconds = no_more_than_larger([measured[x] for x in xs])
    return tuple(np.interp(np.arange(1, max(xs) + 1), xs, seconds).tolist())


def save_table(table: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def load_table(path: str) -> dict:
    """A saved SPS table; raises a ValueError naming the file if it is not one."""
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("sps"), list) or not table["sps"]:
        raise ValueError(f"{path}: not an SPS table (no 'sps' list)")
    try:
        check_table(table["sps"], table.get("sps_rows"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return table
