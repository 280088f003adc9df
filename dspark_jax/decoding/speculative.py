"""Decoding one round at a time: `prefill` starts sequences, `spec_round` advances them.

A round, for every active sequence (row) of the batch:

    the draft appends its pending verified positions and proposes gamma tokens;
    the scheduler picks each row's verify length L (gamma without a scheduler);
    the target verifies [anchor, d_1..d_L] for all rows in one cache extension;
    rejection sampling accepts A tokens and draws the residual or bonus token;
    the target cache rolls back to the committed length; positions anchor..anchor+A become
    the draft's pending context, and the new token the next anchor.

Without a draft (plain autoregressive decoding) a round is L = 0: the target extends by the
anchor and the next token is drawn from its distribution with the same random stream, so a
row whose scheduler verifies nothing produces exactly the autoregressive sample.

With a draft, a scheduler that knows the draft's cost may decide, from the confidences of
the last round drafted, that drafting does not pay (`speculation_pays`; or the caller decides,
`drafting`); the round is then autoregressive for every row and the draft only catches up on
context: it appends the pending positions to its cache (`flush_pending`: `Draft.extend_context`,
no proposal) and the anchor's target feature becomes the pending position, so the draft's
context stays complete for the next drafted round. A caller running several undrafted rounds
in a row can flush once before them instead (`catch_up=False`): each round then appends its
anchor to the pending positions, and the draft runs once for all of them.

All per-sequence state lives in one pytree (`DecodeState`) whose fields lead with the batch
axis, so rows are independent and a caller (`generate`, an engine) owns the state and runs
rounds on it. Models and the scheduler are static arguments (hashable, without weights);
params and the state are traced, so new weights, prompts or sampling values never recompile.

Randomness: row b's draws in a round come from fold_in(request key_b, p_b), p_b the position
of the first token the round can commit, split into a draft, an acceptance and a next-token
stream. Anchor positions strictly increase, so a row never reuses a key (a draft discarded in
one round cannot correlate with the next round's), and a row's draws do not depend on the
other rows of its batch.

An accepted stop token ends its sequence without a bonus token; a row stops after max_new
tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dspark_jax.decoding.rejection import DRAFT_STREAM, NEXT_STREAM, verify, verify_logits
from dspark_jax.decoding.scheduler import AsyncPrefixScheduler, speculation_pays, survival, verify_widths
from dspark_jax.models.draft_config import check_draft_fits
from dspark_jax.models.kv_cache import KVCache, PagedKVCache
from dspark_jax.sampling import SamplingParams, draw, fold, probabilities, row_keys
from pallas_kernels.ragged_paged_attention import IMPLEMENTATIONS as KERNELS
from pallas_kernels.markov_sampling import unsupported as unsupported_markov
from pallas_kernels.ragged_paged_attention import unsupported as unsupported_attention


class DecodeState(NamedTuple):
    target_cache: KVCache | PagedKVCache
    draft_cache: KVCache | PagedKVCache | None  # None without a draft
    pending_features: jax.Array  # [B, G + 1, L_t * H] verified positions the draft has not seen
    pending_next: jax.Array  # [B, G + 1] the committed token after each of them
    pending_count: jax.Array  # [B]
    anchor: jax.Array  # [B] last committed token (not yet in the target cache)
    generated: jax.Array  # [B] tokens committed so far
    max_new: jax.Array  # [B] tokens to generate at most
    done: jax.Array  # [B] bool; padding rows (empty prompts) start done
    sampling: SamplingParams  # per-row fields [B]
    keys: jax.Array  # [B] PRNG key of each request
    stop_ids: jax.Array  # [B, S] int32 stop tokens of each row (-1 pads)
    scheduler_state: Any
    last_confidence: jax.Array  # [B, G] float32 confidence logits of the row's last drafted round (NaN: none yet)


class RoundOutput(NamedTuple):
    tokens: jax.Array  # [B, G + 1] committed tokens, the first `count` of each row valid
    count: jax.Array  # [B] tokens committed this round (0 for rows that did not take part)
    verify_length: jax.Array  # [B] draft tokens sent to the target
    accepted: jax.Array  # [B] draft tokens accepted
    confidence: jax.Array  # [B, G] the draft's confidence logits (zeros without a confidence head or a draft)
    active: jax.Array  # [B] rows that took part
    drafted: jax.Array  # [B] rows that took part in a drafted round (False in autoregressive rounds)
    forecast: jax.Array  # [B] accepted draft tokens the round's confidences forecast: the prefix survivals
    #                      (with the scheduler's temperatures) of the verified slots, up to an accepted stop token
    #                      (as `accepted` counts); 0 without drafting


def check_setup(target_config, draft_config, scheduler) -> None:
    """Clear errors for a draft that does not fit the target, or a scheduler without a draft
    (or without a confidence head to schedule on)."""
    if draft_config is None and scheduler is not None:
        raise ValueError("a scheduler needs a draft")
    if draft_config is not None:
        check_draft_fits(draft_config, target_config)
        if scheduler is not None and getattr(scheduler, "needs_confidence", True) and not draft_config.confidence_head:
            raise ValueError(f"a scheduler needs a draft with a confidence head ({draft_config.algorithm} has none)")


PAGE_SIZE = 32  # positions per page of the paged caches `prefill` makes for the kernel


def use_kernels(target, draft, kernels: str, *, mesh=None, page_size: int = PAGE_SIZE):
    """(target, draft) running with `kernels`: "xla", or "pallas" (the ragged paged attention
    kernel, over caches that are then paged, and for rows without top-k/top-p the fused
    sampling kernels of the draft's slots and of rejection sampling), or "auto" (`resolve_kernels`:
    "pallas" where the kernels are measured faster, else "xla"). Either
    replaces the models' `config.attention` where it is "xla" or "pallas" ("cudnn", which only
    the cache-free forward uses, stays with "xla"). For "pallas", raises a ValueError naming
    what cannot run the kernel: a mesh (the models' or the caller's), or on a GPU a head dim
    (of any layer), page size or key width in bytes it does not take
    (`pallas_kernels.ragged_paged_attention.unsupported`), or a Markov rank
    (`pallas_kernels.markov_sampling.unsupported`)."""
    kernels = resolve_kernels(kernels, target, draft, mesh=mesh, page_size=page_size)
    if kernels == "pallas" and (why := _kernel_obstacle(target, draft, mesh, page_size)):
        raise ValueError(f"kernels='pallas' cannot run here: {why}")

    def chosen(config):
        attention = "pallas" if kernels == "pallas" else ("xla" if config.attention == "pallas" else config.attention)
        return dataclasses.replace(config, attention=attention)

    target = dataclasses.replace(target, config=chosen(target.config))
    if draft is not None:
        draft = dataclasses.replace(draft, config=dataclasses.replace(draft.config, layers=chosen(draft.config.layers)))
    return target, draft


def resolve_kernels(kernels: str, target, draft, *, mesh=None, page_size: int = PAGE_SIZE) -> str:
    """"xla" or "pallas" for `kernels`. "auto" is "pallas" on one GPU, where the ragged paged
    attention kernel takes the target's (and the draft's) shapes and the sampling kernels the
    draft's Markov rank: there the engine's round programs ran 2.3x to 2.7x faster with the
    kernels than with XLA, drafted and undrafted alike, at the shape measured (Qwen3-4B, 64 rows
    of 1,024 positions, an H100; docs/benchmarks.md, "twelfth measurement"). It is
    "xla" under a mesh, on a CPU, where the kernels run interpreted, and on a TPU, where they
    have not run at these shapes."""
    if kernels not in KERNELS + ("auto",):
        raise ValueError(f"kernels must be one of {KERNELS + ('auto',)}, got {kernels!r}")
    if kernels != "auto":
        return kernels
    ok = jax.default_backend() == "gpu" and not _kernel_obstacle(target, draft, mesh, page_size)
    return "pallas" if ok else "xla"


def _kernel_obstacle(target, draft, mesh, page_size: int) -> str | None:
    """Why the Pallas kernels cannot run these models here, or None."""
    if mesh is not None or target.mesh is not None or (draft is not None and draft.mesh is not None):
        return "the kernels run on one device: they have no sharded (mesh) version yet; use 'xla'"
    if jax.default_backend() != "gpu":
        return None
    for config, dtype in [(target.config, target.dtype)] + ([] if draft is None else
                                                             [(draft.config.layers, draft.dtype)]):
        for head_dim in {config.layer_spec(i).head_dim for i in range(config.num_layers)}:
            if why := unsupported_attention(head_dim, page_size, jnp.dtype(dtype).itemsize):
                return why
    if draft is not None and draft.config.markov_rank:
        return unsupported_markov(draft.config.markov_rank)
    return None


def _new_cache(model, attention: str, batch: int, length: int, **ring):
    """An empty cache of `length` positions per row: contiguous, or paged with each row owning
    its own run of pages when the kernel attends ("pallas" reads paged caches only). `ring`
    (the target's max_extension) lets sliding-window layers keep only their window."""
    if attention != "pallas":
        return model.init_cache(batch, length, **ring)
    columns = -(-length // PAGE_SIZE)  # room for at least `length` positions
    table = jnp.arange(batch * columns, dtype=jnp.int32).reshape(batch, columns)  # [B, M]
    return model.init_paged_cache(batch * columns, PAGE_SIZE).rows(table, jnp.zeros((batch,), jnp.int32))


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """tokens [B, ...] against each row's stop ids [B, S] -> bool [B, ...]."""
    stops = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + stop_ids.shape[1:])
    return jnp.any(tokens[..., None] == stops, axis=-1)


def _features(taps: jax.Array) -> jax.Array:
    """[B, T, n, H] tapped layers -> [B, T, n * H] concatenated in tap order."""
    return taps.reshape(taps.shape[:2] + (-1,))


def extend_context(target, draft, scheduler, target_params, draft_params, target_cache, draft_cache, tokens, next_ids,
                   num_new, final, given, generated, max_new, sampling: SamplingParams, keys, stop_ids
                   ) -> tuple[DecodeState, jax.Array]:
    """Runs a chunk of each row's context (its prompt) and starts the rows it completes.

    target_cache / draft_cache: caches of B rows whose lengths are the chunk's start position
    (the draft cache must be as long as the target's); tokens [B, C] with num_new [B] real
    tokens each; next_ids [B, C]: the context token after each position (Eagle3 pairs them);
    final [B]: the chunk ends the row's context. For a final row, `given` [B] is the next token
    when already known (a preempted request resuming; -1 samples it) and generated [B] the
    tokens it has already produced. sampling, keys, max_new, stop_ids: per row, as in
    `DecodeState`.

    The target extends by the whole chunk; the draft by every position except a final chunk's
    last, which becomes the first pending position (its feature pairs with the next token).
    Returns (state of the B rows, the next token of each row [B]). Only final rows carry a
    meaningful state; the others are marked done.
    """
    b = tokens.shape[0]
    g = 0 if draft is None else draft.config.block_size
    taps = () if draft is None else draft.config.target_layer_ids
    start = target_cache.lengths
    logits, _, chunk_taps, tcache = target.extend(target_params, target_cache, tokens, num_new, hidden_layers=taps,
                                                  last_only=True)
    ends = start + num_new  # position of each row's next token
    sampled = draw(fold(row_keys(keys, ends), NEXT_STREAM), probabilities(logits, sampling))  # [B]
    first = jnp.where(given >= 0, given, sampled)
    feats = _features(chunk_taps)  # [B, C, F]
    dcache = None if draft is None else draft.extend_context(draft_params, draft_cache, feats, next_ids,
                                                             jnp.maximum(num_new - final.astype(jnp.int32), 0))
    last = jnp.maximum(num_new - 1, 0)
    pending_features = jnp.zeros((b, g + 1, feats.shape[-1]), feats.dtype)
    pending_features = pending_features.at[:, 0].set(jnp.take_along_axis(feats, last[:, None, None], axis=1)[:, 0])
    live = final & (ends > 0)
    generated = jnp.where(live, generated + (given < 0), 0).astype(jnp.int32)
    state = DecodeState(
        target_cache=tcache, draft_cache=dcache, pending_features=pending_features,
        pending_next=jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(first), pending_count=live.astype(jnp.int32),
        anchor=first, generated=generated, max_new=max_new,
        done=~live | is_stop(first, stop_ids) | (generated >= max_new),
        sampling=sampling, keys=keys, stop_ids=stop_ids,
        scheduler_state=scheduler.init_state(b, g) if isinstance(scheduler, AsyncPrefixScheduler) else (),
        last_confidence=jnp.full((b, g), jnp.nan, jnp.float32),
    )
    return state, first


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames="cache_length")
def prefill(target, draft, scheduler, target_params, draft_params, tokens, lengths, sampling: SamplingParams,
            keys, max_new, stop_ids, *, cache_length: int) -> tuple[DecodeState, jax.Array]:
    """Starts a batch: prefills the target on the prompts and samples each first token.

    target, draft: a TargetModel and a DraftModel (or None); scheduler as in `spec_round`.
    tokens [B, T] right-padded prompts, lengths [B] (0 = a padding row); sampling per-row [B];
    keys [B] request PRNG keys; max_new [B]; stop_ids [B, S]. Returns (state, first tokens [B]).
    """
    b = tokens.shape[0]
    next_ids = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    zeros = jnp.zeros((b,), jnp.int32)
    return extend_context(
        target, draft, scheduler, target_params, draft_params,
        _new_cache(target, target.config.attention, b, cache_length,
                   max_extension=max(tokens.shape[1], 1 + (0 if draft is None else draft.config.block_size))),
        None if draft is None else _new_cache(draft, draft.config.layers.attention, b, cache_length), tokens,
        next_ids, lengths,
        jnp.ones((b,), bool), zeros - 1, zeros, max_new, sampling, keys, stop_ids)


def _verify_step(target, params, cache, candidates, num_new, taps, widths):
    """(logits [B, G + 1, V], taps [B, G + 1, n, H], cache) of the candidates [B, G + 1]."""
    g1 = candidates.shape[1]

    def at_width(width):
        def run(args):
            cache, candidates, num_new = args
            logits, _, vtaps, cache = target.extend(params, cache, candidates[:, :width], num_new, hidden_layers=taps)
            pad = ((0, 0), (0, g1 - width))
            return jnp.pad(logits, pad + ((0, 0),)), jnp.pad(vtaps, pad + ((0, 0), (0, 0))), cache

        return run

    if len(widths) == 1:
        return at_width(widths[0])((cache, candidates, num_new))
    branch = jnp.searchsorted(jnp.asarray(widths), jnp.max(num_new))
    return jax.lax.switch(branch, [at_width(w) for w in widths], (cache, candidates, num_new))


def _autoregressive(target, params, s: DecodeState, active, keys, taps=()):
    """The target extends every active row by its anchor and draws the next token from its
    own distribution. Returns (next token [B], cache, the anchor's features [B, L_t * H])."""
    logits, _, anchor_taps, tcache = target.extend(params, s.target_cache, s.anchor[:, None], active.astype(jnp.int32),
                                                   hidden_layers=taps)
    next_token = draw(fold(keys, NEXT_STREAM), probabilities(logits[:, 0], s.sampling))
    return next_token, tcache, _features(anchor_taps)[:, 0]


PROBE_DRIFT = 0.1  # confidence logits a row's last confidences gain per round that decided not to draft


def flush_pending(draft, draft_params, s: DecodeState, active) -> DecodeState:
    """The active rows' pending positions appended to the draft cache (`Draft.extend_context`,
    no proposal), their pending count 0."""
    dcache = draft.extend_context(draft_params, s.draft_cache, s.pending_features, s.pending_next,
                                  jnp.where(active, s.pending_count, 0))
    return s._replace(draft_cache=dcache, pending_count=jnp.where(active, 0, s.pending_count))


def _undrafted(target, draft, target_params, draft_params, s: DecodeState, active, keys, catch_up: bool,
               drift: float):
    """A round without drafting (module docstring): returns what `_drafted` returns. With
    catch_up the draft first appends the pending positions to its cache (`flush_pending`);
    then the anchor's feature is appended to the pending ones (at index pending count, which
    the round's token pairs with). Without catch_up the caller guarantees a free pending slot.
    The rows' last confidences drift up by `drift` (PROBE_DRIFT when the round decides for
    itself), so that drafting is tried again after a while: without that, a batch whose rows
    stay the same would never draft again, whatever the draft could do now. A caller that
    decides (`drafting`) also decides when to try again, with no drift."""
    b, g1 = s.pending_next.shape
    next_token, tcache, feature = _autoregressive(target, target_params, s, active, keys, draft.config.target_layer_ids)
    if catch_up:
        s = flush_pending(draft, draft_params, s, active)
    rows = jnp.arange(b)
    at = jnp.where(active, s.pending_count, g1)  # inactive rows write nowhere
    features = s.pending_features.at[rows, at].set(feature, mode="drop")
    confidence = jnp.where(active[:, None], s.last_confidence + drift, s.last_confidence)
    zeros = jnp.zeros((b,), jnp.int32)
    return (tcache, s.draft_cache, jnp.zeros((b, g1 - 1), jnp.int32), zeros, zeros, next_token, confidence,
            s.scheduler_state, features, s.pending_count)


def _drafted(target, draft, scheduler, target_params, draft_params, s: DecodeState, active, keys):
    """A drafted round up to rejection sampling: (target cache, draft cache, draft tokens [B, G],
    verify lengths [B], accepted [B], next token [B], confidences [B, G], scheduler state, the
    verified positions' features [B, G + 1, F], pending count before the round [B])."""
    b, g = s.anchor.shape[0], draft.config.block_size
    sched_state = s.scheduler_state
    prop, dcache = draft.propose(draft_params, s.draft_cache, s.pending_features, s.pending_next,
                                 jnp.where(active, s.pending_count, 0), s.anchor, fold(keys, DRAFT_STREAM), s.sampling)
    if scheduler is None:
        length = jnp.full((b,), g, jnp.int32)
    elif isinstance(scheduler, AsyncPrefixScheduler):
        length, sched_state = scheduler.step(prop.confidence, active, sched_state)
    else:
        length = scheduler(prop.confidence, active)
    length = jnp.where(active, length, 0)
    candidates = jnp.concatenate([s.anchor[:, None], prop.tokens], axis=1)  # [B, G + 1]
    logits, vtaps, tcache = _verify_step(target, target_params, s.target_cache, candidates,
                                         jnp.where(active, length + 1, 0), draft.config.target_layer_ids,
                                         verify_widths(g, scheduler))
    if target.config.attention == "pallas" and not s.sampling.filtered:  # the kernels' setting: fused rejection
        verdict = verify_logits(keys, prop.tokens, prop.probs, logits, s.sampling.temperature, length)
    else:
        verdict = verify(keys, prop.tokens, prop.probs, probabilities(logits, s.sampling), length)
    confidence = jnp.where(active[:, None], prop.confidence.astype(jnp.float32), s.last_confidence)
    return (tcache, dcache, prop.tokens, length, verdict.accepted, verdict.next_token, confidence, sched_state,
            _features(vtaps), s.pending_count)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("drafting", "catch_up"))
def spec_round(target, draft, scheduler, target_params, draft_params, s: DecodeState, drafting: bool | None = None,
               catch_up: bool = True) -> tuple[DecodeState, RoundOutput]:
    """One round for every row that is not done (see the module docstring).

    target, draft: a TargetModel and a DraftModel (None: plain autoregressive decoding);
    scheduler: a `dspark_jax.decoding.scheduler` object picking verify lengths from the
    draft's confidences, or None to verify all gamma draft tokens. drafting: None drafts
    unless the scheduler, knowing the draft's cost, decides on the device that it does not
    pay (a branch in the program); True or False fixes the round's kind when the caller
    decided (a serving engine decides on the host, which keeps its programs free of branches),
    and leaves the rows' last confidences as they are in an undrafted round (the caller
    decides when to try drafting again).
    catch_up=False: an undrafted round leaves the pending positions to the caller, who
    flushes them (`flush_pending`) so that every active row has a free pending slot.
    """
    if not catch_up and drafting is not False:
        raise ValueError("catch_up=False is for rounds the caller made undrafted (drafting=False): a drafted "
                         "round can fill the pending positions")
    b = s.anchor.shape[0]
    active = ~s.done
    start = s.target_cache.lengths  # anchor positions
    keys = row_keys(s.keys, start + 1)
    if draft is None:
        g = 0
        next_token, tcache, _ = _autoregressive(target, target_params, s, active, keys)
        dcache, drafts, confidence, sched_state = None, jnp.zeros((b, 0), jnp.int32), s.last_confidence, s.scheduler_state
        accepted = length = pending_count = jnp.zeros((b,), jnp.int32)
        pending_features, speculate = s.pending_features, jnp.asarray(False)
    else:
        g = draft.config.block_size
        drafted = lambda _: _drafted(target, draft, scheduler, target_params, draft_params, s, active, keys)
        undrafted = lambda _: _undrafted(target, draft, target_params, draft_params, s, active, keys, catch_up,
                                         PROBE_DRIFT if drafting is None else 0.0)
        if drafting is None and getattr(scheduler, "draft_seconds", None) is not None:
            speculate = speculation_pays(scheduler, s.last_confidence, active, s.scheduler_state)
            branch = jax.lax.cond(speculate, drafted, undrafted, None)
        else:
            speculate = jnp.asarray(drafting is not False)
            branch = drafted(None) if drafting is not False else undrafted(None)
        (tcache, dcache, drafts, length, accepted, next_token, confidence, sched_state, pending_features,
         pending_count) = branch

    slot = jnp.arange(g + 1)[None, :]
    stop_drafts = is_stop(drafts, s.stop_ids) & (slot[:, :g] < accepted[:, None])
    stopped = jnp.any(stop_drafts, axis=1)
    first_stop = jnp.argmax(stop_drafts, axis=1) if g else accepted
    accepted = jnp.where(stopped, first_stop + 1, accepted)  # end at the stop token
    # Committed tokens: the accepted drafts, then the residual/bonus token unless a draft stopped.
    commit = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)  # [B, G + 1]
    commit = jnp.where(slot == accepted[:, None], next_token[:, None], commit)
    count = accepted + (~stopped).astype(jnp.int32)
    count = jnp.where(active, jnp.minimum(count, s.max_new - s.generated), 0)
    generated = s.generated + count
    next_stops = is_stop(next_token, s.stop_ids) & ~stopped
    done = s.done | (active & (stopped | next_stops | (generated >= s.max_new)))
    # The draft's pending context: a drafted round's verified positions anchor..anchor+A, an
    # undrafted one's earlier pending positions with the anchor appended.
    appended = s.pending_next.at[jnp.arange(b), pending_count].set(next_token, mode="drop")
    state = s._replace(
        target_cache=tcache.rollback(start + 1 + accepted),
        draft_cache=dcache,
        pending_features=pending_features,
        pending_next=jnp.where(speculate, commit, appended),
        pending_count=jnp.where(active, jnp.where(speculate, accepted, pending_count) + 1, 0),
        anchor=jnp.where(active, next_token, s.anchor),
        generated=generated,
        done=done,
        scheduler_state=sched_state,
        last_confidence=confidence,
    )
    drafted_rows = active & speculate
    counted = jnp.where(stopped, jnp.minimum(length, first_stop + 1), length)  # verified up to a stop token
    verified = jnp.arange(confidence.shape[1])[None, :] < jnp.where(drafted_rows, counted, 0)[:, None]  # [B, G]
    forecast = jnp.sum(jnp.where(verified, survival(confidence, getattr(scheduler, "temperatures", None)), 0.0), axis=1)
    return state, RoundOutput(commit, count, length, jnp.where(active, accepted, 0),
                              jnp.where(drafted_rows[:, None], confidence, 0.0), active, drafted_rows, forecast)
