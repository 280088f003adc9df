"""The engine's one jitted program: a decoding round for running rows, plus prefill chunks.

The device state is a `DecodeState` over every request slot of the engine (`max_num_seqs`
rows) whose caches are `PagedKVCache` pools with no rows attached. Between steps the host owns
the block tables; each step attaches the tables of the rows it runs:

1. a decoding round (`spec_round`: speculative, or autoregressive without a draft) over slots
   0..cap-1, cap = table.shape[0], for the rows the host marks `running`;
2. when given, one chunk of context for each row of a `PrefillBatch` (`extend_context`),
   written through the rows' own tables; rows whose chunk ends their context join the state
   at their slots, ready for the next step's round.

Programs are specialised on shapes only: the capacity and view width of the table, the
prefill batch's rows and chunk width. The engine buckets all of them, so a new request
never compiles anything.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dspark_jax.decoding.speculative import DecodeState, RoundOutput, extend_context, spec_round
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


class StepOutput(NamedTuple):
    round: RoundOutput  # of slots 0..cap-1
    done: jax.Array  # [cap] after the round
    first: jax.Array  # [R] next token of each prefill row (meaningful for final rows)
    first_done: jax.Array  # [R] a final row that ended at its first token


def _rows(tree, cap: int):
    return jax.tree.map(lambda x: x[:cap], tree)


def _put_rows(tree, rows, index):
    """tree's leading-axis entries at index [R] set to rows' (out-of-range indices dropped)."""
    return jax.tree.map(lambda x, r: x.at[index].set(r, mode="drop"), tree, rows)


def _detach(rows_cache, pools, cap: int):
    """The pools as updated by a pass over the first cap slots, their lengths written back,
    and the block table detached again."""
    return rows_cache.rows(pools.block_table, pools.lengths.at[:cap].set(rows_cache.lengths))


def _idle_round(state: DecodeState, gamma: int) -> tuple[DecodeState, RoundOutput]:
    b = state.anchor.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return state, RoundOutput(jnp.zeros((b, gamma + 1), jnp.int32), zeros, zeros, zeros,
                              jnp.zeros((b, gamma), jnp.float32), jnp.zeros((b,), bool))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def engine_step(target, draft, scheduler, target_params, draft_params, state: DecodeState, table, running,
                prefill: PrefillBatch | None) -> tuple[DecodeState, StepOutput]:
    """One engine step (module docstring). table [cap, M] block tables of slots 0..cap-1 (free
    slots point at the scratch page); running [cap] bool: rows that decode this step."""
    cap = table.shape[0]
    gamma = 0 if draft is None else draft.config.block_size
    rows = _rows(state._replace(target_cache=None, draft_cache=None), cap)
    rows = rows._replace(
        target_cache=state.target_cache.rows(table, state.target_cache.lengths[:cap]),
        draft_cache=None if draft is None else state.draft_cache.rows(table, state.draft_cache.lengths[:cap]),
        done=rows.done | ~running,
    )
    rows, out = jax.lax.cond(
        jnp.any(~rows.done),
        lambda r: spec_round(target, draft, scheduler, target_params, draft_params, r),
        lambda r: _idle_round(r, gamma),
        rows,
    )
    pools_t, pools_d = state.target_cache, state.draft_cache
    state = jax.tree.map(lambda x, r: x.at[:cap].set(r), state._replace(target_cache=None, draft_cache=None),
                         rows._replace(target_cache=None, draft_cache=None))
    state = state._replace(target_cache=_detach(rows.target_cache, pools_t, cap),
                           draft_cache=None if draft is None else _detach(rows.draft_cache, pools_d, cap))
    done = state.done[:cap]
    if prefill is None:
        return state, StepOutput(out, done, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool))

    p = prefill
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
    return state, StepOutput(out, done, first, new.done)
