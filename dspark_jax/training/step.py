"""The jitted train step: gradient accumulation over micro-batches, then one AdamW update.

State (a dict, saved whole by the checkpointer):
    step       int32 []        optimizer updates done
    params     trainable draft parameters, fp32 master copies
    opt_state  AdamW state over `params`
    key        uint32 [2]      base PRNG key; micro-step m of update s uses fold_in(fold_in(key, s), m)

The frozen embedding / LM head (`frozen`) and the target's parameters are separate arguments,
never updated and never copied. Online mode: the target runs inside the step on each
micro-batch and its tapped features feed the draft directly; offline mode: the micro-batch
carries the features read from a target cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dspark_jax.models.target import target_features
from dspark_jax.sharding import named_sharding
from dspark_jax.training.losses import LossWeights, loss_fn


def make_train_step(draft, optimizer: optax.GradientTransformation, schedule, weights: LossWeights, *,
                    target=None, state_shardings=None):
    """step(state, frozen, target_params, batch) -> (state, metrics).

    draft: a Draft whose dtype is the compute dtype; master params are cast to it per step.
    target: the frozen Target for online mode (target_params then its params), None offline.
    batch: arrays with a leading accumulation axis: input_ids [A, B, S], loss_mask [A, B, S],
    lengths [A, B], and offline also features [A, B, S, L_t * H], last_hidden [A, B, S, H].
    metrics: name -> (numerator, denominator) summed over the micro-batches.
    """
    compute = draft.dtype
    objective = loss_fn(draft.config.algorithm)
    layer_ids = draft.config.target_layer_ids

    def micro_step(params, frozen, target_params, micro, key):
        if target is not None:
            features, last = target_features(target, target_params, micro["input_ids"], layer_ids)
            micro = {**micro, "features": features, "last_hidden": last}

        def loss(trainable):
            cast = jax.tree.map(lambda p: p.astype(compute), trainable)
            return objective(draft, {**cast, **frozen}, micro, key, weights)

        return jax.value_and_grad(loss, has_aux=True)(params)

    def step(state, frozen, target_params, batch):
        accum = batch["input_ids"].shape[0]
        base = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

        def body(carry, xs):
            grads, metrics = carry
            index, micro = xs
            (_, m), g = micro_step(state["params"], frozen, target_params, micro, jax.random.fold_in(base, index))
            grads = jax.tree.map(jnp.add, grads, g)
            metrics = jax.tree.map(jnp.add, metrics, m) if metrics is not None else m
            return (grads, metrics), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        first = jax.tree.map(lambda x: x[0], batch)
        metric_shapes = jax.eval_shape(lambda: micro_step(state["params"], frozen, target_params, first, base)[0][1])
        init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum), batch))
        grads = jax.tree.map(lambda g: g / accum, grads)  # micro-steps weigh equally

        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": (optax.tree.norm(grads), jnp.ones(())),
                   "loss_tokens": (jnp.sum(batch["loss_mask"]).astype(jnp.float32), jnp.ones(())),
                   "lr": (schedule(state["step"]), jnp.ones(()))}
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "key": state["key"]}
        if state_shardings is not None:
            new = jax.lax.with_sharding_constraint(new, state_shardings)
        return new, metrics

    return step


def batch_shardings(mesh, batch: dict) -> dict:
    """NamedShardings for a batch with a leading accumulation axis: sequences over the data axes."""
    def spec(x):
        return named_sharding(mesh, (None, "batch") + (None,) * (x.ndim - 2), x.shape)

    return jax.tree.map(spec, batch)
