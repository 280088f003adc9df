"""The train step: gradient accumulation over micro-batches, then one AdamW update, as one
program (`make_train_step`) or as pieces that take one micro-batch at a time (`make_micro_steps`).

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

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dspark_jax.models.target import target_features
from dspark_jax.sharding import named_sharding
from dspark_jax.training.losses import LossWeights, loss_fn


class MicroSteps(NamedTuple):
    """The train step in pieces, so micro-batches can reach the device one at a time.

    zeros(state, frozen, target_params, micro) -> totals, the zero sums;
    accumulate(totals, state, frozen, target_params, micro, index) -> totals, after micro-batch
        `index` of this update (micro: arrays without the accumulation axis);
    apply(state, totals, accumulation) -> (state, metrics), the AdamW update on the mean gradient;
    evaluate(state, frozen, target_params, micro) -> metric sums of a held-out micro-batch, no
        gradient, with one key for every evaluation of a run (the same anchors each time).
    totals = (gradient sums, metric sums); jit each piece (accumulate donating totals, apply
    donating state). The trainer runs them; `make_train_step` is the first three in one program.
    """

    zeros: Callable
    accumulate: Callable
    apply: Callable
    evaluate: Callable


EVAL_STREAM = 0x7FFFFFFF  # folded into the run's key for held-out evaluation; update keys fold in the step


def make_micro_steps(draft, optimizer: optax.GradientTransformation, schedule, weights: LossWeights, *,
                     target=None, state_shardings=None) -> MicroSteps:
    """The pieces of `make_train_step` (same arguments)."""
    compute = draft.dtype
    objective = loss_fn(draft.config.algorithm)
    layer_ids = draft.config.target_layer_ids

    def micro_metrics(trainable, frozen, target_params, micro, key):
        """(loss, metric sums) of one micro-batch; the target adds its features in online mode."""
        if target is not None:
            features, last = target_features(target, target_params, micro["input_ids"], layer_ids)
            micro = {**micro, "features": features, "last_hidden": last}
        cast = jax.tree.map(lambda p: p.astype(compute), trainable)
        loss, metrics = objective(draft, {**cast, **frozen}, micro, key, weights)
        metrics["loss_tokens"] = (jnp.sum(micro["loss_mask"]).astype(jnp.float32), jnp.ones(()))
        return loss, metrics

    def micro_step(params, frozen, target_params, micro, key):
        (_, metrics), grads = jax.value_and_grad(micro_metrics, has_aux=True)(params, frozen, target_params, micro,
                                                                             key)
        return metrics, grads

    def accumulate(totals, state, frozen, target_params, micro, index):
        base = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
        metrics, grads = micro_step(state["params"], frozen, target_params, micro, jax.random.fold_in(base, index))
        return jax.tree.map(jnp.add, totals, (grads, metrics))

    def zeros(state, frozen, target_params, micro):
        shapes = jax.eval_shape(micro_step, state["params"], frozen, target_params, micro, jax.random.key(0))[0]
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.tree.map(jnp.zeros_like, state["params"]), zero_metrics

    def apply(state, totals, accumulation: int):
        grads, metrics = totals
        grads = jax.tree.map(lambda g: g / accumulation, grads)  # micro-steps weigh equally
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": (optax.tree.norm(grads), jnp.ones(())),
                   "lr": (schedule(state["step"]), jnp.ones(()))}
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "key": state["key"]}
        if state_shardings is not None:
            new = jax.lax.with_sharding_constraint(new, state_shardings)
        return new, metrics

    def evaluate(state, frozen, target_params, micro):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), EVAL_STREAM)
        return micro_metrics(state["params"], frozen, target_params, micro, key)[1]

    return MicroSteps(zeros, accumulate, apply, evaluate)


def make_train_step(draft, optimizer: optax.GradientTransformation, schedule, weights: LossWeights, *,
                    target=None, state_shardings=None):
    """step(state, frozen, target_params, batch) -> (state, metrics): one update in one program.

    draft: a Draft whose dtype is the compute dtype; master params are cast to it per step.
    target: the frozen Target for online mode (target_params then its params), None offline.
    batch: arrays with a leading accumulation axis: input_ids [A, B, S], loss_mask [A, B, S],
    lengths [A, B], and offline also features [A, B, S, L_t * H], last_hidden [A, B, S, H].
    metrics: name -> (numerator, denominator) summed over the micro-batches.
    """
    pieces = make_micro_steps(draft, optimizer, schedule, weights, target=target, state_shardings=state_shardings)

    def step(state, frozen, target_params, batch):
        accum = batch["input_ids"].shape[0]

        def body(totals, xs):
            index, micro = xs
            return pieces.accumulate(totals, state, frozen, target_params, micro, index), None

        init = pieces.zeros(state, frozen, target_params, jax.tree.map(lambda x: x[0], batch))
        totals, _ = jax.lax.scan(body, init, (jnp.arange(accum), batch))
        return pieces.apply(state, totals, accum)

    return step


def batch_shardings(mesh, batch: dict, *, stacked: bool = True) -> dict:
    """NamedShardings for a batch with a leading accumulation axis (or, not stacked, for one
    micro-batch): sequences over the data axes."""
    def spec(x):
        lead = (None, "batch") if stacked else ("batch",)
        return named_sharding(mesh, lead + (None,) * (x.ndim - len(lead)), x.shape)

    return jax.tree.map(spec, batch)
