"""`dspark_jax.generate`: speculative decoding with any drafter, or plain autoregressive decoding.

Output is what the target alone would produce: token for token at temperature 0, and in
distribution otherwise (see `dspark_jax.decoding.rejection`). Identical seeds give identical
outputs; every row draws its own randomness, so identical prompts give independent samples.
One compiled program per (batch, prompt length, cache length) bucket runs a whole generation:
`prefill`, then `spec_round` in a `lax.while_loop` until every row is done.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.batching import bucket, check_prompts, pad_prompts
from dspark_jax.decoding.speculative import check_setup, prefill, spec_round, use_kernels
from dspark_jax.sampling import SamplingParams


@dataclasses.dataclass
class GenerationResult:
    """tokens[i]: generated ids of prompt i (prompt excluded, a final stop token included).

    Per speculative round of prompt i: verify_lengths[i][r] draft tokens were sent to the
    target and accepted_lengths[i][r] of them accepted; the round committed accepted + 1
    tokens (the residual or bonus token), or just the accepted ones when one was a stop token
    or max_new_tokens cut the round short. confidence_logits[i] is [rounds, gamma], the
    draft's confidence logits of each round (zeros without a confidence head). A round that
    did not draft (a scheduler with the draft's cost judged that drafting did not pay) appears
    with verify length 0, accepted 0 and zero confidences. All are empty for autoregressive
    decoding. `dspark_jax.evaluation.evaluation.acceptance_stats` turns
    them into tau and per-position acceptance.
    """

    tokens: list[list[int]]
    verify_lengths: list[list[int]]
    accepted_lengths: list[list[int]]
    confidence_logits: list[np.ndarray]


def request_keys(seed, n: int, pad_to: int) -> jax.Array:
    """PRNG keys [pad_to] of n requests: key(seed[i]) for a sequence of seeds, or n independent
    keys derived from one integer seed."""
    if np.ndim(seed):
        if len(seed) != n:
            raise ValueError(f"seed has {len(seed)} values for {n} prompts")
        seeds = np.zeros((pad_to,), np.uint32)
        seeds[:n] = [_check_seed(s) for s in seed]
        return jax.vmap(jax.random.key)(jnp.asarray(seeds))
    base = jax.random.key(_check_seed(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(pad_to, dtype=jnp.uint32))


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def generate(
    target,
    draft,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float | Sequence[float] = 1.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    seed: int | Sequence[int] = 0,
    scheduler=None,
    stop_ids: Sequence[int] | None = None,
    kernels: str = "xla",
) -> GenerationResult:
    """Generates a continuation of each prompt (lists of token ids).

    draft=None decodes autoregressively. scheduler (a `dspark_jax.decoding.scheduler`
    object) picks per-sequence verify lengths from the draft's confidence head; None verifies
    every draft token. temperature (0 = greedy), top_p, top_k and seed are each one value for
    every prompt or a sequence of one value per prompt; sampling is applied identically to
    target and draft. stop_ids default to the target config's EOS ids. kernels: "xla", or
    "pallas" to attend over paged caches with the ragged paged attention kernel and to sample
    DSpark/DFlash draft slots and verify drafts with the fused sampling kernels (one device,
    shapes they take on a GPU, interpreted on a CPU: `dspark_jax.decoding.speculative.use_kernels`).
    """
    target, draft = use_kernels(target, draft, kernels)
    cfg = target.config
    stop_ids = tuple(cfg.eos_token_ids if stop_ids is None else stop_ids)
    gamma = 0 if draft is None else draft.config.block_size
    check_setup(cfg, None if draft is None else draft.config, scheduler)
    check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings - (gamma + 1 if gamma else 0), max_new_tokens)
    n = len(prompts)
    tokens, lengths = pad_prompts(prompts)
    b = tokens.shape[0]
    sampling = SamplingParams.rows(n, temperature=temperature, top_k=top_k, top_p=top_p, pad_to=b)
    keys = request_keys(seed, n, b)
    stops = np.broadcast_to(np.asarray(stop_ids, np.int32).reshape(1, -1), (b, len(stop_ids)))
    out, count, verify_lengths, accepted, confidences, rounds = _generate(
        target.model, None if draft is None else draft.model, scheduler, target.params,
        None if draft is None else draft.params, jnp.asarray(tokens), jnp.asarray(lengths), sampling, keys,
        jnp.full((b,), max_new_tokens, jnp.int32), jnp.asarray(stops),
        cache_length=bucket(tokens.shape[1] + max_new_tokens + 2 * gamma + 2), max_new_tokens=max_new_tokens,
    )
    out, count, verify_lengths, accepted, confidences, rounds = map(
        np.asarray, (out, count, verify_lengths, accepted, confidences, rounds))
    if draft is None:
        rounds = np.zeros_like(rounds)  # autoregressive steps are not speculative rounds
    return GenerationResult(
        tokens=[out[i, : count[i]].tolist() for i in range(n)],
        verify_lengths=[verify_lengths[i, : rounds[i]].tolist() for i in range(n)],
        accepted_lengths=[accepted[i, : rounds[i]].tolist() for i in range(n)],
        confidence_logits=[confidences[i, : rounds[i]] for i in range(n)],
    )


def generate_autoregressive(target, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                            sampling: SamplingParams = SamplingParams(), seed: int = 0,
                            stop_ids: Sequence[int] | None = None, params=None) -> list[list[int]]:
    """Generated token ids per prompt with the target alone (prompt excluded, a final stop
    token included): `generate` without a draft, with `params` in place of target.params."""
    if params is not None:
        target = dataclasses.replace(target, params=params)
    return generate(target, None, prompts, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, stop_ids=stop_ids).tokens


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("cache_length", "max_new_tokens"))
def _generate(target, draft, scheduler, target_params, draft_params, tokens, lengths, sampling, keys, max_new,
              stop_ids, *, cache_length: int, max_new_tokens: int):
    """prefill, then rounds until every row is done. Returns (generated [B, N + G + 1],
    count [B], verify_lengths [B, N], accepted [B, N], confidence logits [B, N, G], rounds [B])
    with N = max_new_tokens: row b took part in rounds 0..rounds[b]-1."""
    b, n = tokens.shape[0], max_new_tokens
    g = 0 if draft is None else draft.config.block_size
    state, first = prefill(target, draft, scheduler, target_params, draft_params, tokens, lengths, sampling, keys,
                           max_new, stop_ids, cache_length=cache_length)
    out = jnp.zeros((b, n + g + 1), jnp.int32).at[:, 0].set(first)
    logs = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n, g), jnp.float32))
    rows = jnp.arange(b)[:, None]

    def body(carry):
        state, out, (verify_lengths, accepted, confidences), row_rounds, r = carry
        written = state.generated
        state, o = spec_round(target, draft, scheduler, target_params, draft_params, state)
        slot = jnp.arange(g + 1)[None, :]
        pos = jnp.where(slot < o.count[:, None], written[:, None] + slot, out.shape[1])  # [B, G + 1] slots of `out`
        out = out.at[rows, pos].set(o.tokens, mode="drop")
        logs = (verify_lengths.at[:, r].set(o.verify_length), accepted.at[:, r].set(o.accepted),
                confidences.at[:, r].set(o.confidence))
        return state, out, logs, row_rounds + o.active.astype(jnp.int32), r + 1

    def unfinished(carry):
        return ~jnp.all(carry[0].done) & (carry[4] < n)

    carry = (state, out, logs, jnp.zeros((b,), jnp.int32), jnp.zeros((), jnp.int32))
    state, out, (verify_lengths, accepted, confidences), row_rounds, _ = jax.lax.while_loop(unfinished, body, carry)
    return out, state.generated, verify_lengths, accepted, confidences, row_rounds
