"""Device time of one decoding step of each kind: target verify (or AR decode) and draft proposal.

Each is timed as `steps` repetitions inside one jitted loop, every repetition against the
same cache state (the cache is rolled back after each), so the figure is the step's device
time at a fixed context with dispatch amortised. Token values do not change the time, so
the inputs are random; the weights are whatever the model holds. Attention reads every slot
of a cache, so a step's time depends on the cache's capacity as well as on the context: pass
the capacity the decoding loop being modelled allocates.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time

import jax
import jax.numpy as jnp

from dspark_jax.sampling import SamplingParams

logger = logging.getLogger(__name__)


WARMUP_SECONDS = 0.2  # an accelerator idle through a compile needs a moment to come back to its clocks


def timed(fn, *, warmup: int = 3, reps: int = 7, iters: int = 10) -> float:
    """Median seconds per call of fn() (fn must block on its result); the first call compiles,
    and warm-up runs at least `warmup` calls and WARMUP_SECONDS after it."""
    start = time.perf_counter()
    fn()
    logger.info(f"  first call {time.perf_counter() - start:.1f} s")
    start, calls = time.perf_counter(), 1
    while calls < warmup or time.perf_counter() - start < WARMUP_SECONDS:
        fn()
        calls += 1
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def timed_chain(program, carry, iters: int, reps: int = 7) -> float:
    """Median seconds per call of a program whose (donated) output is its next input."""
    state = [carry]

    def call():
        state[0] = program(state[0])
        jax.block_until_ready(state[0])

    return timed(call, iters=iters, reps=reps, warmup=2)


def verify_seconds(target, *, batch: int, tokens: int, context: int, capacity: int, steps: int = 8,
                   reps: int = 5) -> float:
    """Seconds of one `Target.extend` of `tokens` tokens per sequence on `batch` sequences
    holding `context` positions of a `capacity`-slot cache (tokens=1: an autoregressive
    decode step)."""
    ids = jax.random.randint(jax.random.key(tokens), (batch, tokens), 0, target.config.vocab_size, jnp.int32)
    num_new = jnp.full((batch,), tokens, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=1)
    def verify_steps(params, cache):
        def step(_, cache):
            _, _, _, new = target.extend(params, cache, ids, num_new)
            return new.rollback(cache.lengths)

        return jax.lax.fori_loop(0, steps, step, cache)

    if context + tokens > capacity:
        raise ValueError(f"context {context} + {tokens} tokens exceed the cache capacity {capacity}")
    cache = target.init_cache(batch, capacity).replace(lengths=jnp.full((batch,), context, jnp.int32))
    return timed_chain(lambda c: verify_steps(target.params, c), cache, iters=1, reps=reps) / steps


def draft_seconds(draft, *, batch: int, context: int, capacity: int, sampling: SamplingParams, steps: int = 8,
                  reps: int = 5) -> float:
    """Seconds of one `Draft.propose` on `batch` sequences at `context` positions of a
    `capacity`-slot cache: the cache takes gamma + 1 verified rows (a fully accepted round)
    and one block is drafted."""
    q = draft.config.block_size + 1
    if context + q > capacity:
        raise ValueError(f"context {context} + {q} rows exceed the cache capacity {capacity}")
    features = jax.random.normal(jax.random.key(2), (batch, q, draft.config.feature_size), draft.dtype)
    next_ids = jnp.zeros((batch, q), jnp.int32)
    num_new = jnp.full((batch,), q, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=1)
    def draft_steps(params, cache, key):
        def step(i, carry):
            cache, tokens = carry
            prop, new = draft.propose(params, cache, features, next_ids, num_new, tokens[:, -1],
                                      jax.random.fold_in(key, i), sampling)
            return new.rollback(cache.lengths), prop.tokens

        return jax.lax.fori_loop(0, steps, step, (cache, jnp.zeros((batch, q - 1), jnp.int32)))

    cache = draft.init_cache(batch, capacity).replace(lengths=jnp.full((batch,), context - q, jnp.int32))
    run = lambda carry: draft_steps(draft.params, carry[0], jax.random.key(3))
    return timed_chain(run, (cache, None), iters=1, reps=reps) / steps
