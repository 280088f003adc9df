"""Training losses and metrics of the drafters (reference sections 4 and 5.2).

Block drafters (DSpark, DFlash): N anchors per sequence, each scoring a block of gamma slots
teacher-forced on the dataset tokens. Slot j of the block at anchor a predicts token a+1+j;
its target distribution is the target's own next-token distribution at position a+j
(softmax of the frozen LM head over the target's final hidden state). Per slot:
    ce   = -log softmax(D)[y]                               (D: draft logits after the Markov bias)
    tv   = sum_v |softmax(D) - softmax(Z)|                  (the full L1 norm, 2 x TV)
    conf = BCE(c, alpha*),  alpha* = clip(1 - tv / 2, 0, 1) (soft label, no gradient)
weighted by w_j = eval_mask_j * exp(-j / loss_decay_gamma), and each term is normalised by the
sum of weights over the whole micro-batch (the reference's global denominator). With
`LossWeights.chunk` the LM head, ce and tv come from `fused_loss` instead, a chunk of slots at a
time, which never builds the [slots, V] logits.

Eagle3: the training-time-test unroll; step k at position t is trained with a soft cross-
entropy against the target distribution at t+k+1, masked by the loss mask shifted k places,
normalised by the sequence length, and the steps are weighted by step_loss_decay^k.

Every function returns (loss, metrics) where metrics maps a name to a (numerator, denominator)
pair, so logging windows, micro-steps and devices aggregate as sum(num) / sum(den).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dspark_jax.models.layers import lm_logits
from dspark_jax.training.fused_loss import fused_block_losses

EPS = 1e-6


class LossWeights(NamedTuple):
    """The terms' weights, and how the block losses meet the vocabulary."""

    ce: float = 0.1
    tv: float = 0.9
    confidence: float = 1.0
    decay_gamma: float = 4.0  # w_j = exp(-j / decay_gamma)
    chunk: int = 0  # 0: whole [slots, V] logits; N: `fused_loss`, N slots of each sequence at a time
    kernel: str = "xla"  # with a chunk: "pallas" runs each chunk's softmaxes and gradient on pallas_kernels/vocab_loss


def sample_anchors(key: jax.Array, loss_mask: jax.Array, num_anchors: int) -> tuple[jax.Array, jax.Array]:
    """Anchors for block training (reference 4.5).

    loss_mask: [B, S] bool. Candidates are positions a with loss_mask[a] and loss_mask[a + 1];
    min(num_anchors, #candidates) of them are drawn uniformly without replacement, sorted
    ascending, and the rest of the N slots are dummy anchors (position 0, keep False).
    Returns (anchors [B, A] int32, keep [B, A] bool).
    """
    b, s = loss_mask.shape
    candidate = jnp.pad(loss_mask[:, :-1] & loss_mask[:, 1:], ((0, 0), (0, 1)))  # [B, S]
    draw = jnp.where(candidate, jax.random.uniform(key, (b, s)), 2.0)
    n = min(num_anchors, s)
    chosen = jnp.argsort(draw, axis=1)[:, :n].astype(jnp.int32)  # [B, n]
    keep = jnp.take_along_axis(candidate, chosen, axis=1)
    chosen = jnp.sort(jnp.where(keep, chosen, s), axis=1)  # valid ascending, dummies last
    keep = chosen < s
    anchors = jnp.where(keep, chosen, 0)
    pad = num_anchors - n
    return jnp.pad(anchors, ((0, 0), (0, pad))), jnp.pad(keep, ((0, 0), (0, pad)))


def frozen_head(params) -> tuple[jax.Array, jax.Array | None]:
    """The target's embedding [V, H] and LM head [H, V] (None when tied) inside draft params."""
    return params["embed_tokens"], params.get("lm_head")


def block_loss(draft, params, batch: dict, key: jax.Array, weights: LossWeights):
    """Loss and metrics of one micro-batch for a DSpark/DFlash drafter.

    batch: input_ids [B, S] int32, loss_mask [B, S] bool, lengths [B] int32, features
    [B, S, L_t * H] and last_hidden [B, S, H] (the target's final-normed hidden states).
    """
    cfg = draft.config
    ids, mask, lengths = batch["input_ids"], batch["loss_mask"], batch["lengths"]
    s, g = ids.shape[1], cfg.block_size
    anchors, keep = sample_anchors(key, mask, cfg.num_anchors)  # [B, A]
    if weights.chunk:
        hidden, vec, conf = draft.block_head_inputs(params, batch["features"], ids, anchors, keep)  # conf: [B, A, G]
    else:
        logits, conf, _ = draft.block_forward(params, batch["features"], ids, anchors, keep)  # [B, A, G, V], [B, A, G]

    j = jnp.arange(g)
    label_pos = anchors[:, :, None] + 1 + j  # [B, A, G]
    inside = label_pos < lengths[:, None, None]
    label_pos = jnp.minimum(label_pos, s - 1)
    labels = jnp.take_along_axis(ids[:, None, :], label_pos, axis=2)
    supervised = jnp.take_along_axis(mask[:, None, :], label_pos, axis=2) & inside & keep[:, :, None]
    eval_mask = jnp.cumprod(supervised.astype(jnp.float32), axis=-1)  # contiguous from slot 0
    w = eval_mask * jnp.exp(-j / weights.decay_gamma)  # [B, A, G]

    aligned = jnp.take_along_axis(batch["last_hidden"][:, None], (label_pos - 1)[..., None], axis=2)  # [B, A, G, H]
    den = jnp.sum(w)
    if weights.chunk:
        b, slots = ids.shape[0], labels.shape[1] * g
        flat = lambda x: None if x is None else x.reshape((b, slots) + x.shape[3:])  # [B, A, G, ...] -> [B, A*G, ...]
        w2 = params["markov_head"]["markov_w2"] if vec is not None else None
        scaled = flat(w / (den + EPS))
        loss, ce, l1 = fused_block_losses(flat(hidden), flat(aligned), flat(labels), weights.ce * scaled,
                                          weights.tv * scaled, *frozen_head(params), flat(vec), w2,
                                          softcap=cfg.layers.final_logit_softcapping, chunk=weights.chunk,
                                          l1_grad=weights.tv != 0, kernel=weights.kernel, mesh=draft.mesh)
        ce, l1 = ce.reshape(labels.shape), l1.reshape(labels.shape)  # [B, A, G]
    else:
        target_logits = lm_logits(aligned, *frozen_head(params), cfg.layers.final_logit_softcapping)  # [B, A, G, V]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]  # [B, A, G]
        l1 = jnp.sum(jnp.abs(jnp.exp(log_p) - jax.nn.softmax(target_logits, axis=-1)), axis=-1)  # [B, A, G]
        loss = weights.ce * jnp.sum(w * ce) / (den + EPS)
        if weights.tv:
            loss = loss + weights.tv * jnp.sum(w * l1) / (den + EPS)
    alpha = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0))

    metrics = {"ce_loss": (jnp.sum(w * ce), den), "l1_loss": (jnp.sum(w * l1), den)}
    if cfg.confidence_head:
        bce = jnp.maximum(conf, 0) - conf * alpha + jnp.log1p(jnp.exp(-jnp.abs(conf)))
        loss_conf = jnp.sum(w * bce) / (den + EPS)
        loss = loss + weights.confidence * loss_conf
        predicted = jax.nn.sigmoid(conf)
        metrics["confidence_loss"] = (jnp.sum(w * bce), den)
        metrics["confidence_abs_error"] = (jnp.sum(eval_mask * jnp.abs(predicted - alpha)), jnp.sum(eval_mask))
        metrics["confidence_bias"] = (jnp.sum(eval_mask * (predicted - alpha)), jnp.sum(eval_mask))
        survive_pred = jnp.cumprod(predicted, axis=-1) * eval_mask
        survive_true = jnp.cumprod(alpha, axis=-1) * eval_mask
        metrics["confidence_cumprod_bias"] = (jnp.sum(survive_pred - survive_true), jnp.sum(eval_mask))
    metrics.update(_acceptance_metrics(alpha, eval_mask, keep.astype(jnp.float32)))
    metrics["valid_anchors"] = (jnp.sum(keep), jnp.asarray(ids.shape[0], jnp.float32))
    metrics["block_supervised_tokens"] = (jnp.sum(eval_mask), jnp.sum(keep))
    metrics["loss"] = (loss, jnp.ones((), jnp.float32))
    return loss, metrics


def _acceptance_metrics(alpha: jax.Array, mask: jax.Array, starts: jax.Array) -> dict:
    """accept_rate@j and tau_probabilistic from analytic acceptance rates.

    alpha, mask: [..., G] (slot j of a block or TTT step j at a position); starts: [...]
    weight of each block (1 for a real block). tau = 1 + sum_j prod_{j' <= j} alpha_j' mask_j'.
    """
    metrics = {}
    for j in range(alpha.shape[-1]):
        metrics[f"accept_rate@{j}"] = (jnp.sum(alpha[..., j] * mask[..., j]), jnp.sum(mask[..., j]))
    survive = jnp.cumprod(alpha * mask, axis=-1)
    metrics["tau_probabilistic"] = (jnp.sum(starts * (1.0 + jnp.sum(survive, axis=-1))), jnp.sum(starts))
    return metrics


def eagle3_loss(draft, params, batch: dict, key: jax.Array, weights: LossWeights):
    """Loss and metrics of one micro-batch for an Eagle3 drafter (reference 5.2). `key` unused.

    The G unroll steps' losses run under a scan whose body is rematerialised, so one step's
    [B, S, V] logits live at a time, in the forward and in the backward.
    """
    del key, weights
    cfg = draft.config
    ids, mask, lengths = batch["input_ids"], batch["loss_mask"], batch["lengths"]
    b, s = ids.shape
    g = cfg.block_size
    outs = draft.ttt_forward(params, batch["features"], ids)  # [G, B, S, H]
    target_logits = lm_logits(batch["last_hidden"], *frozen_head(params), cfg.layers.final_logit_softcapping)
    target_logp = jax.nn.log_softmax(target_logits, axis=-1)  # [B, S, V]
    t = jnp.arange(s)
    valid = t[None, :] < lengths[:, None]
    m0 = mask & valid & (t[None, :] != lengths[:, None] - 1)  # [B, S]
    log_uniform = -jnp.log(target_logp.shape[-1])

    def shifted(x, by, fill):  # x[:, t + by] along the sequence, `fill` past its end
        index = t + by
        inside = (index < s)[None, :]
        moved = jnp.take(x, jnp.minimum(index, s - 1), axis=1)
        return jnp.where(inside.reshape(inside.shape + (1,) * (x.ndim - 2)), moved, fill)

    @jax.checkpoint
    def unroll_step(k, out):  # step k at every position: out [B, S, H]
        logp = jax.nn.log_softmax(draft.logits(params, out), axis=-1)  # [B, S, V]
        p = jnp.exp(shifted(target_logp, k + 1, log_uniform))  # P_{t+k+1}
        m_k = shifted(m0, k, False).astype(jnp.float32)  # m0[t + k]
        soft_ce = -jnp.sum(p * logp, axis=-1)  # [B, S]
        alpha = jnp.clip(1.0 - 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - p), axis=-1), 0.0, 1.0)
        hit = (jnp.argmax(logp, axis=-1) == shifted(ids, k + 2, 0)).astype(jnp.float32)  # x_{t+k+2}
        labelled = m_k * (t[None, :] + k + 2 < lengths[:, None])  # the last masked row predicts past the end
        step_loss = jnp.mean(jnp.sum(m_k * soft_ce, axis=1) / lengths)
        return step_loss, (jnp.sum(m_k * soft_ce), jnp.sum(m_k), jnp.sum(labelled * hit), jnp.sum(labelled),
                           jax.lax.stop_gradient(alpha), m_k)

    steps = jnp.arange(g)
    step_losses, (ploss, weight, hits, labelled, alphas, masks) = jax.lax.map(
        lambda x: unroll_step(*x), (steps, outs))  # each [G, ...]
    loss = jnp.sum(cfg.step_loss_decay ** steps.astype(jnp.float32) * step_losses)
    metrics = {}
    for k in range(g):
        metrics[f"ploss_{k}"] = (ploss[k], weight[k])
        metrics[f"accuracy@{k}"] = (hits[k], labelled[k])
    metrics.update(_acceptance_metrics(jnp.moveaxis(alphas, 0, -1), jnp.moveaxis(masks, 0, -1),
                                       m0.astype(jnp.float32)))
    metrics["loss"] = (loss, jnp.ones((), jnp.float32))
    return loss, metrics


def loss_fn(algorithm: str):
    return eagle3_loss if algorithm == "eagle3" else block_loss
