"""The jitted draft -> schedule -> verify -> accept loop of speculative decoding.

One compiled program per (batch, prompt, cache) bucket runs a whole generation:

    prefill the target on the prompts (keeping the tapped features the draft needs), sample
    each sequence's first token, give the draft every prompt position but the last;
    repeat until every sequence is done:
        the draft appends its pending verified positions and proposes gamma tokens;
        the scheduler picks each sequence's verify length L (gamma without a scheduler);
        the target verifies [anchor, d_1..d_L] for all sequences in one cache extension;
        rejection sampling accepts A tokens and draws the residual or bonus token;
        the target cache rolls back to the committed length; positions anchor..anchor+A
        become the draft's pending context, and the new token the next anchor.

An accepted stop token ends its sequence without a bonus token; `max_new_tokens` truncates.
All per-sequence state lives in one pytree (`_State`), so sequences are independent rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dspark_jax.decoding.rejection import verify
from dspark_jax.sampling import SamplingParams, probabilities, sample
from dspark_jax.decoding.scheduler import AsyncPrefixScheduler
from dspark_jax.models.kv_cache import KVCache


class _State(NamedTuple):
    target_cache: KVCache
    draft_cache: KVCache
    pending_features: jax.Array  # [B, G + 1, L_t * H] verified positions the draft has not seen
    pending_next: jax.Array  # [B, G + 1] the committed token after each of them
    pending_count: jax.Array  # [B]
    anchor: jax.Array  # [B] last committed token (not yet in the target cache)
    out: jax.Array  # [B, N + G + 1] generated tokens
    count: jax.Array  # [B] valid entries of out
    done: jax.Array  # [B]
    rounds: jax.Array  # [] rounds run so far
    row_rounds: jax.Array  # [B] rounds each sequence took part in
    verify_lengths: jax.Array  # [B, N] per round: draft tokens sent to the target
    accepted: jax.Array  # [B, N] per round: draft tokens accepted
    confidences: jax.Array  # [B, N, G] per round: the draft's confidence logits
    scheduler_state: Any
    key: jax.Array


def _features(taps: jax.Array) -> jax.Array:
    """[B, T, n, H] tapped layers -> [B, T, n * H] concatenated in tap order."""
    return taps.reshape(taps.shape[:2] + (-1,))


@functools.partial(
    jax.jit, static_argnums=(0, 1), static_argnames=("max_new_tokens", "cache_length", "sampling", "stop_ids", "scheduler")
)
def speculative_loop(
    target, draft, target_params, draft_params, tokens, lengths, key, *,
    max_new_tokens: int, cache_length: int, sampling: SamplingParams, stop_ids: tuple[int, ...], scheduler,
):
    """tokens [B, T] right-padded prompts, lengths [B] (0 = padding row).

    Returns (generated [B, N + G + 1], count [B], verify_lengths [B, N], accepted [B, N],
    confidence logits [B, N, G], rounds [B]) with N = max_new_tokens: row b took part in
    rounds 0..rounds[b]-1 (a sequence is active from the first round until it finishes).
    """
    b = tokens.shape[0]
    g = draft.config.block_size
    taps = draft.config.target_layer_ids
    stops = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    is_stop = lambda tok: jnp.any(tok[..., None] == stops, axis=-1)
    key, k_first = jax.random.split(key)

    tcache = target.init_cache(b, cache_length)
    logits, _, prompt_taps, tcache = target.extend(
        target_params, tcache, tokens, lengths, hidden_layers=taps, last_only=True
    )
    first = sample(k_first, logits, sampling)  # [B]
    feats = _features(prompt_taps)  # [B, T, F]
    # Feature t pairs with token t + 1; the last prompt position pairs with the first token.
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    dcache = draft.extend_context(draft_params, draft.init_cache(b, cache_length), feats, nxt,
                                  jnp.maximum(lengths - 1, 0))
    last = jnp.maximum(lengths - 1, 0)
    pending_features = jnp.zeros((b, g + 1, feats.shape[-1]), feats.dtype)
    pending_features = pending_features.at[:, 0].set(jnp.take_along_axis(feats, last[:, None, None], axis=1)[:, 0])
    pending_next = jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(first)
    live = lengths > 0
    out = jnp.zeros((b, max_new_tokens + g + 1), jnp.int32).at[:, 0].set(first)
    count = live.astype(jnp.int32)
    state = _State(
        target_cache=tcache, draft_cache=dcache, pending_features=pending_features, pending_next=pending_next,
        pending_count=live.astype(jnp.int32), anchor=first, out=out, count=count,
        done=~live | is_stop(first) | (count >= max_new_tokens), rounds=jnp.zeros((), jnp.int32),
        row_rounds=jnp.zeros((b,), jnp.int32),
        verify_lengths=jnp.zeros((b, max_new_tokens), jnp.int32), accepted=jnp.zeros((b, max_new_tokens), jnp.int32),
        confidences=jnp.zeros((b, max_new_tokens, g), jnp.float32),
        scheduler_state=scheduler.init_state(b, g) if isinstance(scheduler, AsyncPrefixScheduler) else (),
        key=key,
    )

    # With a scheduler, the verify pass runs at the smallest width (a power of two, or G + 1)
    # that holds every row's 1 + L tokens, so shorter verification is also cheaper.
    widths = [g + 1] if scheduler is None else sorted({min(1 << i, g + 1) for i in range(1, (g + 1).bit_length() + 1)})

    def verify_at(width):
        def run(args):
            cache, candidates, num_new = args
            logits, _, vtaps, cache = target.extend(target_params, cache, candidates[:, :width], num_new,
                                                    hidden_layers=taps)
            pad = ((0, 0), (0, g + 1 - width))
            return jnp.pad(logits, pad + ((0, 0),)), jnp.pad(vtaps, pad + ((0, 0), (0, 0))), cache

        return run

    def verify_step(cache, candidates, num_new):
        """(logits [B, G + 1, V], taps [B, G + 1, n, H], cache) of the verified tokens."""
        if len(widths) == 1:
            return verify_at(widths[0])((cache, candidates, num_new))
        branch = jnp.searchsorted(jnp.asarray(widths), jnp.max(num_new))
        return jax.lax.switch(branch, [verify_at(w) for w in widths], (cache, candidates, num_new))

    def round_(s: _State) -> _State:
        key, k_draft, k_verify = jax.random.split(s.key, 3)
        active = ~s.done
        prop, dcache = draft.propose(draft_params, s.draft_cache, s.pending_features, s.pending_next,
                                     s.pending_count, s.anchor, k_draft, sampling)
        sched_state = s.scheduler_state
        if scheduler is None:
            length = jnp.full((b,), g, jnp.int32)
        elif isinstance(scheduler, AsyncPrefixScheduler):
            length, sched_state = scheduler.step(prop.confidence, active, sched_state)
        else:
            length = scheduler(prop.confidence, active)
        length = jnp.where(active, length, 0)

        start = s.target_cache.lengths  # anchor positions
        candidates = jnp.concatenate([s.anchor[:, None], prop.tokens], axis=1)  # [B, G + 1]
        logits, vtaps, tcache = verify_step(s.target_cache, candidates, jnp.where(active, length + 1, 0))
        verdict = verify(k_verify, prop.tokens, prop.probs, probabilities(logits, sampling), length)
        accepted = verdict.accepted
        slot = jnp.arange(g)
        stop_drafts = is_stop(prop.tokens) & (slot[None, :] < accepted[:, None])
        stopped = jnp.any(stop_drafts, axis=1)
        accepted = jnp.where(stopped, jnp.argmax(stop_drafts, axis=1) + 1, accepted)  # end at the stop token
        # Committed tokens: the accepted drafts, then the residual/bonus token unless a draft stopped.
        commit = jnp.concatenate([prop.tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)  # [B, G + 1]
        commit = jnp.where(jnp.arange(g + 1)[None, :] == accepted[:, None], verdict.next_token[:, None], commit)
        n_commit = accepted + (~stopped).astype(jnp.int32)
        n_commit = jnp.where(active, jnp.minimum(n_commit, max_new_tokens - s.count), 0)
        pos = s.count[:, None] + jnp.arange(g + 1)[None, :]  # [B, G + 1] target slots in `out`
        write = jnp.arange(g + 1)[None, :] < n_commit[:, None]
        rows = jnp.arange(b)[:, None]
        out = s.out.at[rows, jnp.where(write, pos, s.out.shape[1])].set(commit, mode="drop")
        count = s.count + n_commit
        next_stops = is_stop(verdict.next_token) & ~stopped
        done = s.done | (active & (stopped | next_stops | (count >= max_new_tokens)))

        r = s.rounds
        verify_lengths = s.verify_lengths.at[:, r].set(jnp.where(active, length, 0))
        accepted_log = s.accepted.at[:, r].set(jnp.where(active, accepted, 0))
        return _State(
            target_cache=tcache.rollback(start + 1 + accepted),
            draft_cache=dcache,
            pending_features=_features(vtaps),
            pending_next=commit,
            pending_count=jnp.where(active, accepted + 1, 0),
            anchor=jnp.where(active, verdict.next_token, s.anchor),
            out=out, count=count, done=done, rounds=r + 1, row_rounds=s.row_rounds + active.astype(jnp.int32),
            verify_lengths=verify_lengths, accepted=accepted_log,
            confidences=s.confidences.at[:, r].set(prop.confidence),
            scheduler_state=sched_state, key=key,
        )

    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.rounds < max_new_tokens), round_, state)
    return final.out, final.count, final.verify_lengths, final.accepted, final.confidences, final.row_rounds
