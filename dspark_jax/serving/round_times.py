"""The engine's own rounds timed, and a serving SPS table calibrated to them.

A serving table (`evaluation.sps.profile_serving_sps`) times the target's verify passes alone,
and `profile_draft_seconds` the draft's pass alone. A round of the engine
(`serving.step.engine_round`) does more: the Markov head's sequential slots, the confidence
head, rejection sampling, the scheduler, and in an undrafted round the draft's catch-up over
the pending positions. Priced from passes alone, drafting looked cheaper than it was: on an
H100 with SmolLM2-135M at one row, a drafted round was priced at 1.50 ms, and the engine's
rounds put it at up to 2.6 ms (docs/results.md, "The scheduler live").

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
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.batching import bucket
from dspark_jax.decoding.scheduler import PrefixScheduler
from dspark_jax.evaluation.sps import no_more_than_larger, profile_serving_sps
from dspark_jax.serving.engine import Engine
from dspark_jax.serving.step import engine_round

FLAT_SPS = (500.0,) * 512  # every verify width priced alike: Algorithm 1 verifies every draft token


def round_seconds(target, draft, *, rows: int, context: int, drafting: bool = True, num_rounds: int = 1,
                  page_size: int = 16, kernels: str = "auto", mesh=None, steps: int = 4, reps: int = 3) -> float:
    """Seconds per round of the engine's round program with `rows` running rows whose contexts
    hold `context` positions (each its own pages), as an `Engine` of these settings runs it:
    its capacity (rows rounded up as the engine buckets them), block-table width and attention
    kernels, `num_rounds` rounds per program; autoregressive without a draft, else undrafted or
    drafted (`drafting`) under a confidence scheduler whose flat table verifies every draft
    token (the widest verify pass, with the scheduler's own work and its drafting decision).
    After a first (compiling) call, each of `reps` reps times 1 program and then 1 + `steps`
    programs, each from the rows at `context` (`decoding_from`); the difference of the two
    (each the fastest of the reps) per program cancels what the first program's launch adds
    (host-side dispatch, milliseconds for a model of many layers, which a serving engine hides
    behind the step in flight), leaving the device's time per program (or the host's, when
    launching is the slower), divided by `num_rounds`."""
    gamma = 0 if draft is None else draft.config.block_size
    cap = bucket(rows, 4)
    scheduler = None if draft is None else PrefixScheduler(FLAT_SPS, draft_seconds=(1e-3,))
    pages = -(-(context + (1 + steps) * num_rounds * (gamma + 1)) // page_size)  # a rep's writes
    engine = Engine(target, draft, scheduler=scheduler, max_num_seqs=cap, page_size=page_size,
                    num_pages=rows * pages + 1, num_scheduler_steps=num_rounds, kernels=kernels, mesh=mesh,
                    background_compile=False)
    table = np.zeros((cap, engine._table_width_for(pages)), np.int32)  # free slots read the scratch page 0
    table[:rows, :pages] = 1 + np.arange(rows * pages, dtype=np.int32).reshape(rows, pages)
    running = np.arange(cap) < rows
    models = (engine.target.model, None if draft is None else engine.draft.model, engine.scheduler)
    weights = (engine.target.params, None if draft is None else engine.draft.params)
    decision = (np.float32(1), np.full((gamma,), np.nan, np.float32))  # the confidences trusted, no fallback
    run = lambda s: engine_round(*models, *weights, s, table, running, *decision, num_rounds,
                                 drafting or draft is None)[0]

    def seconds(n: int) -> float:  # n programs from the rows at `context`, from a synchronised start
        nonlocal state
        state = jax.block_until_ready(decoding_from(state, running, context))
        start = time.perf_counter()
        for _ in range(n):
            state = run(state)
        jax.block_until_ready(state)
        return time.perf_counter() - start

    state = engine.state
    seconds(1)
    timings = np.array([(seconds(1), seconds(1 + steps)) for _ in range(reps)])  # [reps, 2]
    one, more = timings.min(axis=0)  # each at its quietest rep
    return (more - one) / steps / num_rounds


def decoding_from(state, running, context: int):
    """`state` (an engine's, over its slots) with every `running` [cap] slot at `context`
    positions, decoding with nothing generated yet and 2^30 tokens to go, and the other slots
    done; a fresh buffer for each field it sets (the round program donates its state)."""
    cap = running.shape[0]
    lengths = lambda cache: None if cache is None else cache.replace(
        lengths=jnp.asarray(np.where(running, context, 0), jnp.int32))
    rows = lambda value: jnp.asarray(np.full(cap, value, np.int32))
    return state._replace(done=jnp.asarray(~running), generated=rows(0), max_new=rows(2**30),
                          target_cache=lengths(state.target_cache), draft_cache=lengths(state.draft_cache))


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
    rounds as measured, "calibrated_for" the settings."""
    gamma = draft.config.block_size
    rows = sorted(set(concurrencies))
    passes = profile_serving_sps(target, gamma, rows, context)
    settings = dict(context=context, num_rounds=num_rounds, page_size=page_size, kernels=kernels, mesh=mesh)
    # each row count's two kinds of round timed one after the other: a device whose speed drifts
    # during the calibration (its clocks) then moves both prices alike
    undrafted, drafted = zip(*[[round_seconds(target, draft, rows=c, drafting=drafting, **settings)
                                for drafting in (False, True)] for c in rows])
    # r rows cost at most what more rows do (a slow first sample is lowered to the next one)
    verify, draft_s = calibrate(1.0 / np.asarray(passes["sps"]), no_more_than_larger(undrafted),
                                no_more_than_larger(drafted))
    return {"sps_rows": rows, "sps": (1.0 / verify).tolist(),
            "draft_seconds": np.interp(np.arange(1, rows[-1] + 1), rows, draft_s).tolist(),  # linear in rows
            "round_seconds": {"undrafted": list(undrafted), "drafted": list(drafted)},
            "calibrated_for": {"context": context, "num_rounds": num_rounds, "page_size": page_size,
                               "kernels": kernels}}
