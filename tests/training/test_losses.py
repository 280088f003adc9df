"""Training losses against independent references written from reference sections 4 and 5.2.

DSpark / DFlash: the loss of one micro-batch is recomputed in float64 numpy, block by block,
on logits from the float64 numpy drafter (tests/models/dspark_numpy.py); gradients are checked
as directional derivatives against central finite differences of that float64 loss (with the
confidence head's soft labels held fixed, as the reference detaches them).
Eagle3: the TTT loss is recomputed in numpy from per-position inference chains
(`Draft.score_block`), and its gradient against a slow per-position JAX implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.draft import Draft
from dspark_jax.models.draft_config import draft_config_for_target
from dspark_jax.training.losses import LossWeights, block_loss, eagle3_loss, sample_anchors
from tests.models.dspark_numpy import dspark_block, sigmoid
from tests.models.test_drafts import TARGETS

G, S, B, N = 4, 24, 2, 6
LENGTHS = np.array([24, 17])


@functools.lru_cache(maxsize=None)
def make_draft(algorithm):
    layer_ids = (0, 2, 3, 4, 5) if algorithm == "eagle3" else (-1, 2, 4)
    config = draft_config_for_target(TARGETS["qwen3"], algorithm, layer_ids, num_layers=None if algorithm == "eagle3"
                                     else 2, block_size=G, mask_token_id=88, markov_rank=8, num_anchors=N)
    draft = Draft.random(config, seed=3, dtype="float32")
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, draft.params)  # make every term matter
    return Draft(config, params, jnp.float32)


def make_batch(draft, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = draft.config.layers.hidden_size
    ids = jax.random.randint(k[0], (B, S), 0, draft.config.layers.vocab_size)
    mask = np.zeros((B, S), bool)
    mask[0, 3:14] = mask[0, 16:24] = True  # two assistant spans
    mask[1, 5:17] = True
    return {
        "input_ids": ids,
        "loss_mask": jnp.asarray(mask),
        "lengths": jnp.asarray(LENGTHS, jnp.int32),
        "features": jax.random.normal(k[1], (B, S, draft.config.feature_size)),
        "last_hidden": 3 * jax.random.normal(k[2], (B, S, h)),
    }


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_block_loss(p64, config, batch, anchors, keep, weights, fixed_alpha=None):
    """float64 loss of reference section 4, one block and one slot at a time.
    Returns (loss, {(b, n, j): alpha}) so a perturbed evaluation can hold the soft labels fixed."""
    ids, mask, feats, last = (np.asarray(batch[k]) for k in ("input_ids", "loss_mask", "features", "last_hidden"))
    head = p64["lm_head"]
    num = {"ce": 0.0, "tv": 0.0, "conf": 0.0}
    den, alphas = 0.0, {}
    for b in range(B):
        for n in range(N):
            if not keep[b, n]:
                continue
            a = int(anchors[b, n])
            block = np.zeros(G, np.int64)
            real = ids[b, a + 1 : a + 1 + G]
            block[: len(real)] = real
            logits, conf = dspark_block(p64, config, np.asarray(feats[b], np.float64), a, int(ids[b, a]), block)
            for j in range(G):
                pos = a + 1 + j
                if pos >= LENGTHS[b] or not mask[b, pos]:
                    break  # eval mask is contiguous from slot 0
                w = np.exp(-j / weights.decay_gamma)
                pd, pt = softmax(logits[j]), softmax(np.asarray(last[b, a + j], np.float64) @ head)
                l1 = np.abs(pd - pt).sum()
                alpha = alphas[b, n, j] = np.clip(1 - l1 / 2, 0, 1) if fixed_alpha is None else fixed_alpha[b, n, j]
                num["ce"] += w * -np.log(pd[ids[b, pos]])
                num["tv"] += w * l1
                if config.confidence_head:
                    s = sigmoid(conf[j])
                    num["conf"] += w * -(alpha * np.log(s) + (1 - alpha) * np.log(1 - s))
                den += w
    loss = weights.ce * num["ce"] / (den + 1e-6) + weights.tv * num["tv"] / (den + 1e-6)
    if config.confidence_head:
        loss += weights.confidence * num["conf"] / (den + 1e-6)
    return loss, alphas


@pytest.mark.parametrize("algorithm,weights", [
    ("dspark", LossWeights()), ("dflash", LossWeights(1.0, 0.0, 0.0)),
    ("dspark", LossWeights(chunk=5)), ("dflash", LossWeights(1.0, 0.0, 0.0, chunk=7)),  # 24 slots a sequence
], ids=["dspark", "dflash", "dspark-fused", "dflash-fused"])
def test_block_loss_and_gradient_match_float64_reference(algorithm, weights):
    """Whole-vocabulary logits, and `fused_loss` in chunks: 5 of 5 slots (the last padded) and 4 of 6."""
    draft = make_draft(algorithm)
    batch = make_batch(draft)
    key = jax.random.key(7)
    anchors, keep = (np.asarray(x) for x in sample_anchors(key, batch["loss_mask"], N))
    own, _, _ = Draft.split(draft.params)
    frozen = Draft.frozen(draft.params)

    def ours(trainable):
        return block_loss(draft, {**trainable, **frozen}, batch, key, weights)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(own)
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), draft.params)
    ref, alphas = numpy_block_loss(p64, draft.config, batch, anchors, keep, weights)
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)
    assert float(metrics["loss"][0]) == pytest.approx(float(loss))

    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(2):
        direction = jax.tree.map(lambda x: rng.standard_normal(x.shape), own)
        moved = lambda sign: {**p64, **jax.tree.map(lambda p, d: np.asarray(p, np.float64) + sign * eps * d,
                                                      own, direction)}
        fd = (numpy_block_loss(moved(1), draft.config, batch, anchors, keep, weights, alphas)[0]
              - numpy_block_loss(moved(-1), draft.config, batch, anchors, keep, weights, alphas)[0]) / (2 * eps)
        terms = [np.asarray(g, np.float64) * d for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))]
        analytic = sum(float(t.sum()) for t in terms)
        scale = sum(float(np.abs(t).sum()) for t in terms)  # no cancellation in the bound
        assert abs(analytic - fd) <= 1e-5 * scale, (analytic, fd, scale)


def test_dummy_blocks_contribute_nothing_and_stay_finite():
    """A sequence with a single supervised pair: one real anchor, N - 1 fully masked blocks."""
    draft = make_draft("dspark")
    batch = make_batch(draft)
    mask = np.zeros((B, S), bool)
    mask[:, 10:12] = True
    batch["loss_mask"] = jnp.asarray(mask)
    anchors, keep = sample_anchors(jax.random.key(0), batch["loss_mask"], N)
    np.testing.assert_array_equal(np.asarray(keep).sum(1), [1, 1])
    np.testing.assert_array_equal(np.asarray(anchors)[:, 0], [10, 10])
    own, _, _ = Draft.split(draft.params)
    frozen = Draft.frozen(draft.params)
    objective = lambda t: block_loss(draft, {**t, **frozen}, batch, jax.random.key(0), LossWeights())[0]
    loss, grads = jax.jit(jax.value_and_grad(objective))(own)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), draft.params)
    ref, _ = numpy_block_loss(p64, draft.config, batch, np.asarray(anchors), np.asarray(keep), LossWeights())
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)


def test_anchor_sampling_is_uniform_over_candidates():
    """Candidates a have loss_mask[a] and loss_mask[a + 1]; each is drawn with probability N / #candidates."""
    mask = np.zeros((1, 40), bool)
    mask[0, 5:15] = mask[0, 30:36] = True  # candidates 5..13 and 30..34: 14 positions
    candidates = set(range(5, 14)) | set(range(30, 35))
    draws = jax.vmap(lambda k: sample_anchors(k, jnp.asarray(mask), 4))(jax.random.split(jax.random.key(1), 3000))
    anchors, keep = np.asarray(draws[0][:, 0]), np.asarray(draws[1][:, 0])
    assert keep.all()
    assert all(set(row) <= candidates and len(set(row)) == 4 and list(row) == sorted(row) for row in anchors)
    counts = np.bincount(anchors.ravel(), minlength=40)[sorted(candidates)]
    expected = 3000 * 4 / 14
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 36.0  # chi-square, 13 dof: p ~ 0.0006


def eagle3_reference_logits(draft, params, batch):
    """For every sequence b and start t, the inference chain from anchor t + 1, all scored in
    one batch of B * S chains: logits [B, S, G, V]."""
    ids = batch["input_ids"]
    padded = jnp.pad(ids, ((0, 0), (0, G + 2)))
    t = jnp.arange(S)
    blocks = padded[:, t[:, None] + 2 + jnp.arange(G)]  # [B, S, G] tokens x_{t+2..t+G+1}
    logits, _ = draft.score_block(
        params,
        jnp.repeat(batch["features"], S, axis=0),  # [B * S, S, F]
        jnp.tile(t + 1, B),
        padded[:, 1 : S + 1].reshape(-1),
        blocks.reshape(B * S, G),
        context_ids=jnp.repeat(ids, S, axis=0),
    )
    return logits.reshape(B, S, G, -1)


def numpy_eagle3_loss(logits, batch, decay, head):
    """Reference 5.2 in float64: soft CE against P_{t+k+1}, mask m_k[t] = m_0[t + k], / L."""
    logits = np.asarray(logits, np.float64)
    mask, last = np.asarray(batch["loss_mask"]), np.asarray(batch["last_hidden"], np.float64)
    total = 0.0
    for b in range(B):
        length = LENGTHS[b]
        m0 = mask[b].copy()
        m0[length - 1 :] = False
        for k in range(G):
            step = 0.0
            for t in range(S - k):
                if not m0[t + k]:
                    continue
                logp = np.log(softmax(logits[b, t, k]))
                target = softmax(last[b, t + k + 1] @ head) if t + k + 1 < S else np.full(logp.shape, 1 / len(logp))
                step += -(target * logp).sum()
            total += decay**k * step / length / B
    return total


def test_eagle3_loss_and_gradient_match_reference():
    draft = make_draft("eagle3")
    batch = make_batch(draft)
    own, _, _ = Draft.split(draft.params)
    frozen = Draft.frozen(draft.params)
    decay = draft.config.step_loss_decay
    weights = LossWeights()

    def ours(trainable):
        return eagle3_loss(draft, {**trainable, **frozen}, batch, None, weights)[0]

    loss, grads = jax.jit(jax.value_and_grad(ours))(own)
    ref = numpy_eagle3_loss(jax.jit(eagle3_reference_logits, static_argnums=0)(draft, draft.params, batch), batch, decay,
                            np.asarray(draft.params["lm_head"], np.float64))
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)

    m0 = np.asarray(batch["loss_mask"]).copy()
    for b in range(B):
        m0[b, LENGTHS[b] - 1 :] = False

    def slow(trainable):
        """The same loss from per-position inference chains, in jnp."""
        logp = jax.nn.log_softmax(eagle3_reference_logits(draft, {**trainable, **frozen}, batch), -1)  # [B, S, G, V]
        target = jax.nn.log_softmax(batch["last_hidden"] @ frozen["lm_head"], -1)
        total = 0.0
        for b in range(B):
            for k in range(G):
                t = np.nonzero(m0[b, k:])[0]  # positions with m_k[t]
                rows = target[b, t + k + 1]
                total += decay**k * -jnp.sum(jnp.exp(rows) * logp[b, t, k]) / LENGTHS[b] / B
        return total

    slow_grads = jax.jit(jax.grad(slow))(own)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(slow_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=2e-6 * float(jnp.abs(r).max()))
