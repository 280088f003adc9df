"""Plain autoregressive generation with the target alone (the speculative-decoding baseline).

One jitted program per (batch, prompt, cache) bucket: prefill all prompts into a KV cache,
then a `lax.while_loop` that appends one token per unfinished sequence until every sequence
has hit a stop token or `max_new_tokens`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.batching import bucket, check_prompts, pad_prompts
from dspark_jax.sampling import SamplingParams, sample
from dspark_jax.models.target import Target


def generate_autoregressive(
    target: Target,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    params=None,
) -> list[list[int]]:
    """Generated token ids per prompt (prompt excluded, a final stop token included)."""
    cfg = target.config
    check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings, max_new_tokens)
    stop_ids = tuple(cfg.eos_token_ids if stop_ids is None else stop_ids)
    tokens, lengths = pad_prompts(prompts)
    out, counts = _ar_loop(
        target,
        target.params if params is None else params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        cache_length=bucket(tokens.shape[1] + max_new_tokens),
        sampling=sampling,
        stop_ids=stop_ids,
    )
    out, counts = np.asarray(out), np.asarray(counts)
    return [out[i, : counts[i]].tolist() for i in range(len(prompts))]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "cache_length", "sampling", "stop_ids"))
def _ar_loop(target, params, tokens, lengths, key, *, max_new_tokens, cache_length, sampling, stop_ids):
    """tokens [B, T] right-padded prompts, lengths [B] (0 = padding row).

    Returns (generated [B, max_new_tokens] int32, count [B] int32 of valid entries per row).
    """
    b = tokens.shape[0]
    stops = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    is_stop = lambda tok: jnp.any(tok[:, None] == stops[None, :], axis=-1)

    cache = target.init_cache(b, cache_length)
    logits, _, _, cache = target.extend(params, cache, tokens, lengths, last_only=True)  # [B, V]
    key, sub = jax.random.split(key)
    tok = sample(sub, logits, sampling)  # [B]
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    count = jnp.where(lengths > 0, 1, 0).astype(jnp.int32)
    done = (lengths == 0) | is_stop(tok) | (count >= max_new_tokens)

    def cond(state):
        return ~jnp.all(state[4])

    def body(state):
        cache, tok, out, count, done, key = state
        active = ~done
        logits, _, _, cache = target.extend(params, cache, tok[:, None], active.astype(jnp.int32))
        key, sub = jax.random.split(key)
        tok = sample(sub, logits[:, 0], sampling)
        write = active[:, None] & (jnp.arange(max_new_tokens)[None, :] == count[:, None])  # [B, N]
        out = jnp.where(write, tok[:, None], out)
        count = count + active.astype(jnp.int32)
        done = done | is_stop(tok) | (count >= max_new_tokens)
        return cache, tok, out, count, done, key

    _, _, out, count, _, _ = jax.lax.while_loop(cond, body, (cache, tok, out, count, done, key))
    return out, count
