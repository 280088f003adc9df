"""Calibration metrics against direct computations, and STS on a known miscalibration."""

import numpy as np

from dspark_jax.evaluation.calibration import (
    auroc,
    brier,
    ece,
    fit_sts,
    load_sts,
    predicted_survival,
    reliability_diagram,
    save_sts,
    survival_records,
)


def test_ece_hand_example():
    pred = np.asarray([[0.1], [0.12], [0.9], [0.95]])
    label = np.asarray([[0], [1], [1], [1]], bool)
    # bins of width 0.05: {0.1, 0.12} -> |0.11 - 0.5| * 2/4; {0.9} -> 0.1/4; {0.95} -> 0.05/4
    np.testing.assert_allclose(ece(pred, label, np.ones_like(label)), [0.195 + 0.025 + 0.0125])


def test_auroc_and_brier_against_direct_formulas():
    rng = np.random.default_rng(0)
    pred = rng.uniform(size=(3000, 2))
    label = rng.uniform(size=(3000, 2)) < pred ** 2
    mask = rng.uniform(size=(3000, 2)) < 0.8
    for j in range(2):
        p, y = pred[mask[:, j], j], label[mask[:, j], j]
        pos, neg = p[y], p[~y]
        exact = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (len(pos) * len(neg))
        assert abs(auroc(pred, label, mask)[j] - exact) < 0.002
        np.testing.assert_allclose(brier(pred, label, mask)[j], np.mean((p - y) ** 2))


def synthetic_rounds(n, rng, gamma=5, overconfidence=3.0):
    """Rounds whose true conditional survival is s_j; the head reports logit(s_j) * 3."""
    s = rng.beta(4, 2, size=(n, gamma))
    accepted_each = rng.uniform(size=(n, gamma)) < s
    accepted = np.sum(np.cumprod(accepted_each, axis=1), axis=1)
    logits = overconfidence * np.log(s / (1 - s))
    return logits, np.arange(gamma)[None, :] < accepted[:, None], np.ones((n, gamma), bool)


def test_sts_lowers_held_out_ece_at_every_position():
    rng = np.random.default_rng(1)
    train, held_out = synthetic_rounds(20000, rng), synthetic_rounds(20000, rng)
    temps = fit_sts(*train)
    assert np.all(np.abs(temps - 3.0) < 0.75), temps  # it finds the overconfidence factor
    before = ece(predicted_survival(held_out[0]), held_out[1], held_out[2])
    after = ece(predicted_survival(held_out[0], temps), held_out[1], held_out[2])
    assert np.all(after < before), (before, after)
    assert np.all(after < 0.02)


def test_survival_records_drop_last_rounds_and_unverified_slots(tmp_path):
    conf = [np.zeros((3, 4), np.float32), np.ones((1, 4), np.float32)]
    logits, label, mask = survival_records(conf, [[4, 2, 4], [4]], [[1, 2, 0], [4]])
    assert logits.shape == (2, 4)  # second sequence has no complete round
    np.testing.assert_array_equal(label, [[1, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert save_sts(str(tmp_path), [1.5, 2.0]).endswith("sts.json")
    assert load_sts(str(tmp_path)) == (1.5, 2.0) and load_sts(str(tmp_path / "none")) is None
    reliability_diagram(predicted_survival(logits), label, mask, str(tmp_path / "r.png"), "test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
