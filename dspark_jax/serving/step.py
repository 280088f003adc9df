"""The engine's two jitted programs: a decoding round for running rows, and prefill chunks.

The device state is a `DecodeState` over every request slot of the engine (`max_num_seqs`
rows) whose caches are `PagedKVCache` pools with no rows attached. Between programs the host
owns the block tables; each program attaches the tables of the rows it runs:

1. `engine_round`: `num_rounds` decoding rounds in a row (`spec_round`: speculative, or
   autoregressive without a draft or when the host decided that drafting does not pay, in
   which case the draft takes in the pending positions once before the rounds rather than in
   each) over slots 0..cap-1, cap = table.shape[0], for the rows the host marks `running` (a
   row that finishes sits out the remaining rounds);
2. `engine_prefill`: one chunk of context for each row of a `PrefillBatch`
   (`extend_context`), written through the rows' own tables; rows whose chunk ends their
   context join the state at their slots, ready for a round.

An engine step runs the prefill, then the rounds, each only when it has rows (a row whose
prefill ends its context decodes in the same step's rounds when the host has pages for
them). They are two programs, not one, so that the programs compiled are the round shapes
plus the prefill shapes rather than their product. Each is specialised on shapes only (the
round on its capacity and table width, on whether it drafts, and on the engine's fixed
`num_rounds`; the prefill on its rows, chunk width and table width), all bucketed by the
engine, so a new request never compiles anything.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dspark_jax.decoding.scheduler import speculation_pays
from dspark_jax.decoding.speculative import DecodeState, RoundOutput, extend_context, flush_pending, spec_round
from dspark_jax.sampling import SamplingParams


class PrefillBatch(NamedTuple):
    slots: jax.Array  # [R] int32 engine slot of each row (num slots for padding rows: dropped)
    table: jax.Array  # [R, M] block table of each row
    start: jax.Array  # [R] position of the chunk's first token
    tokens: jax.Array  # [R, C] the chunk, num_new[r] real tokens
    next_ids: jax.Array  # [R, C] the context token after each position
    num_new: jax.Array  # [R]
    final: jax.Array  # [R] bool: the chunk ends the row's context
    given: jax.Array  # [R] the known next token of a resuming row, else -1
    generated: jax.Array  # [R] tokens generated before a preemption
    max_new: jax.Array  # [R]
    sampling: SamplingParams  # per-row fields [R]
    seeds: jax.Array  # [R] uint32: each request's PRNG key is jax.random.key(seed)
    stop_ids: jax.Array  # [R, S]


def _rows(tree, cap: int):
    return jax.tree.map(lambda x: x[:cap], tree)


def _put_rows(tree, rows, index):
    """tree's leading-axis entries at index [R] set to rows' (out-of-range indices dropped)."""
    return jax.tree.map(lambda x, r: x.at[index].set(r, mode="drop"), tree, rows)


def _attach(pools, table, running):
    """The pools seen by slots 0..cap-1 through `table`; slots not running get length 0, so
    that attention over them reads nothing (a kernel reads up to a row's length)."""
    cap = table.shape[0]
    return pools.rows(table, jnp.where(running, pools.lengths[:cap], 0))


def _detach(rows_cache, pools, running):
    """The pools as updated by a pass over the first cap slots, the running rows' lengths
    written back (the others keep theirs), and the block table detached again."""
    cap = running.shape[0]
    lengths = jnp.where(running, rows_cache.lengths, pools.lengths[:cap])
    return rows_cache.rows(pools.block_table, pools.lengths.at[:cap].set(lengths))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 10, 11), donate_argnums=(5,))
def engine_round(target, draft, scheduler, target_params, draft_params, state: DecodeState, table, running,
                 forecast_scale, fallback, num_rounds: int, drafting: bool
                 ) -> tuple[DecodeState, RoundOutput, jax.Array, jax.Array]:
    """num_rounds rounds for the running rows among slots 0..cap-1, drafted or not
    (`drafting`). table [cap, M] block tables (free slots point at the scratch page; a row's
    pages cover all the rounds' writes); running [cap] bool; forecast_scale (float32 scalar)
    and fallback (float32 [G]) for `speculation_pays`. Returns the state, the rounds' outputs
    for slots 0..cap-1 (each field [num_rounds, cap, ...]), done [cap] after the last round,
    and whether drafting pays for the rows still running, or for those that ran when all have
    finished (`speculation_pays`: True when the scheduler does not know the draft's cost)."""
    cap = table.shape[0]
    before = _rows(state._replace(target_cache=None, draft_cache=None), cap)
    rows = before._replace(
        target_cache=_attach(state.target_cache, table, running),
        draft_cache=None if draft is None else _attach(state.draft_cache, table, running),
        done=before.done | ~running,
    )
    # Undrafted rounds leave their anchors pending; the draft takes in the step's pending
    # positions once, before the rounds, when the pending buffer holds all the rounds' anchors.
    catch_up = drafting or draft is None or num_rounds > rows.pending_next.shape[1]
    if not catch_up:
        rows = flush_pending(draft, draft_params, rows, ~rows.done)
    rows, out = jax.lax.scan(lambda r, _: spec_round(target, draft, scheduler, target_params, draft_params, r,
                                                     drafting=drafting, catch_up=catch_up), rows, length=num_rounds)
    # (with no row left, the rows that ran speak for the requests that follow: no rows at all would say "draft")
    deciding = jnp.where(jnp.any(~rows.done), ~rows.done, running)
    pays = speculation_pays(scheduler, rows.last_confidence, deciding, rows.scheduler_state, forecast_scale, fallback)
    # rows that did not run keep their state as it was (a row just prefilled waits for its first round)
    keep = lambda new, old: new if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key) else jnp.where(
        running.reshape((cap,) + (1,) * (new.ndim - 1)), new, old)
    rows_state = jax.tree.map(keep, rows._replace(target_cache=None, draft_cache=None), before)
    pools_t, pools_d = state.target_cache, state.draft_cache
    state = jax.tree.map(lambda x, r: x.at[:cap].set(r), state._replace(target_cache=None, draft_cache=None),
                         rows_state)
    state = state._replace(target_cache=_detach(rows.target_cache, pools_t, running),
                           draft_cache=None if draft is None else _detach(rows.draft_cache, pools_d, running))
    return state, out, state.done[:cap], pays


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def engine_prefill(target, draft, scheduler, target_params, draft_params, state: DecodeState, p: PrefillBatch
                   ) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One chunk of context per row of `p`. Returns the state, the next token of each row
    (meaningful for final rows) [R], and whether a final row ended at that token [R]."""
    new, first = extend_context(
        target, draft, scheduler, target_params, draft_params,
        state.target_cache.rows(p.table, p.start),
        None if draft is None else state.draft_cache.rows(p.table, p.start),
        p.tokens, p.next_ids, p.num_new, p.final, p.given, p.generated, p.max_new, p.sampling,
        jax.vmap(jax.random.key)(p.seeds), p.stop_ids)
    detached = state.target_cache.block_table
    joined = jnp.where(p.final, p.slots, state.anchor.shape[0])  # rows that start decoding
    per_row = _put_rows(state._replace(target_cache=None, draft_cache=None),
                        new._replace(target_cache=None, draft_cache=None), joined)
    state = per_row._replace(
        target_cache=new.target_cache.rows(detached, state.target_cache.lengths.at[p.slots].set(
            new.target_cache.lengths, mode="drop")),
        draft_cache=None if draft is None else new.draft_cache.rows(detached, state.draft_cache.lengths.at[p.slots].set(
            new.draft_cache.lengths, mode="drop")),
    )
    return state, first, new.done
