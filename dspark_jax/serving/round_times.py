"""The engine's own rounds timed, and a serving SPS table calibrated to them.

A serving table (`evaluation.sps.profile_serving_sps`) times the target's verify passes alone,
and `profile_draft_seconds` the draft's pass alone. A round of the engine
(`serving.step.engine_round`) does more: the Markov head's sequential slots, the confidence
head, rejection sampling, the scheduler, and in an undrafted round the draft's catch-up over
the pending positions. Priced from passes alone, drafting looked cheaper than it was: on an
H100 with SmolLM2-135M at one row, a drafted round was priced at 1.50 ms, and the engine's
rounds put it near 2.6 ms (docs/results.md, "The scheduler live").

`engine_table` therefore measures both and calibrates the passes to the rounds, at each row
count c:
- u(c), d(c): seconds per round of the engine's round program, undrafted and drafted (every
  draft token verified), `round_seconds`;
- p(c, w): the verify pass of w tokens per row, w = 1..gamma + 1.
The calibrated table prices a round's verify pass of w tokens at p(c, w) + u(c) - p(c, 1), so
that an undrafted round costs exactly u(c) and the widths keep the passes' differences (which
Algorithm 1 weighs), and the draft at d(c) - (p(c, gamma + 1) + u(c) - p(c, 1)), so that a
drafted round of full width costs exactly d(c) (at least 0).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from dspark_jax.decoding.scheduler import FixedScheduler
from dspark_jax.evaluation.sps import profile_serving_sps
from dspark_jax.serving.engine import Engine
from dspark_jax.serving.step import engine_round


def round_seconds(target, draft, *, rows: int, context: int, drafting: bool = True, num_rounds: int = 1,
                  page_size: int = 16, kernels: str = "auto", mesh=None, steps: int = 4, reps: int = 3) -> float:
    """Seconds per round of the engine's round program over `rows` running rows whose contexts
    hold `context` positions (each its own pages), as an `Engine` of these settings runs it
    (`num_rounds` rounds per program, its attention kernels): autoregressive without a draft,
    else undrafted or drafted (`drafting`) with every draft token verified
    (FixedScheduler(gamma)). The best of `reps` timings of `steps` programs after a first
    (compiling) one, divided by `num_rounds`."""
    gamma = 0 if draft is None else draft.config.block_size
    positions = context + (1 + steps * reps) * num_rounds * (gamma + 1)  # every write of the timed programs
    pages = -(-positions // page_size)
    engine = Engine(target, draft, scheduler=None if draft is None else FixedScheduler(gamma), max_num_seqs=rows,
                    page_size=page_size, num_pages=rows * pages + 1, num_scheduler_steps=num_rounds, kernels=kernels,
                    mesh=mesh, background_compile=False)
    table = (1 + np.arange(rows * pages, dtype=np.int32)).reshape(rows, pages)  # page 0 is the scratch page
    running = np.ones((rows,), bool)
    state = engine.state
    lengths = lambda cache: None if cache is None else cache.replace(lengths=cache.lengths.at[:rows].set(context))
    state = state._replace(done=state.done & False, max_new=state.max_new + 2**30,  # every row decodes throughout
                           target_cache=lengths(state.target_cache), draft_cache=lengths(state.draft_cache))
    models = (engine.target.model, None if draft is None else engine.draft.model, engine.scheduler)
    weights = (engine.target.params, None if draft is None else engine.draft.params)
    run = lambda s: engine_round(*models, *weights, s, table, running, num_rounds, drafting or draft is None)[0]
    state = jax.block_until_ready(run(state))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps):
            state = run(state)
        jax.block_until_ready(state)
        best = min(best, (time.perf_counter() - start) / steps)
    return best / num_rounds


def calibrate(pass_seconds, undrafted, drafted) -> tuple[np.ndarray, np.ndarray]:
    """(verify seconds [C, gamma + 1], draft seconds [C]) from the passes' seconds
    pass_seconds [C, gamma + 1] (row count c, w = 1..gamma + 1 tokens per row) and the rounds'
    undrafted [C] and drafted [C] (module doc)."""
    pass_seconds = np.asarray(pass_seconds, float)
    overhead = np.asarray(undrafted, float) - pass_seconds[:, 0]  # [C] what a round adds to its pass
    verify = pass_seconds + overhead[:, None]
    return verify, np.maximum(np.asarray(drafted, float) - verify[:, -1], 0.0)


def engine_table(target, draft, concurrencies, context: int, *, num_rounds: int = 1, page_size: int = 16,
                 kernels: str = "auto", mesh=None) -> dict:
    """A serving table ({"sps_rows", "sps", "draft_seconds"}, `decoding.scheduler`) for an
    engine of these settings, calibrated to its rounds (module doc); "round_seconds" holds the
    rounds as measured."""
    gamma = draft.config.block_size
    rows = sorted(set(concurrencies))
    passes = profile_serving_sps(target, gamma, rows, context)
    settings = dict(context=context, num_rounds=num_rounds, page_size=page_size, kernels=kernels, mesh=mesh)
    undrafted = [round_seconds(target, draft, rows=c, drafting=False, **settings) for c in rows]
    drafted = [round_seconds(target, draft, rows=c, drafting=True, **settings) for c in rows]
    verify, draft_s = calibrate(1.0 / np.asarray(passes["sps"]), undrafted, drafted)
    # r rows cost at most what more rows do; by row count r = 1..max(c), linear between the measured ones
    draft_s = np.minimum.accumulate(draft_s[::-1])[::-1]
    return {"sps_rows": rows, "sps": (1.0 / verify).tolist(),
            "draft_seconds": np.interp(np.arange(1, rows[-1] + 1), rows, draft_s).tolist(),
            "round_seconds": {"undrafted": undrafted, "drafted": drafted}}
