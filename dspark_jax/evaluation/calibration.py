"""Calibration of the confidence head: survival records, ECE / AUROC / Brier, STS, diagrams.

A verified round gives, for each draft slot j it verified, the predicted prefix survival
a_j = prod_{i<=j} sigmoid(c_i / T_i) and the label y_j = 1[slots 0..j all accepted]. Metrics
are per position, as in the reference evaluator: ECE over 20 equal-width bins, AUROC from
1000-bin histograms, Brier score. Sequential Temperature Scaling (paper section 3.2.1) fits
T_1..T_G left to right, each by a 1-D grid search minimising the ECE of the cumulative product
with the earlier temperatures fixed; temperature scaling preserves every ranking.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

STS_FILE = "sts.json"
# 256 log-spaced temperatures in [0.05, 20], plus 1.0 (no change).
STS_GRID = np.unique(np.append(np.geomspace(0.05, 20.0, 256), 1.0))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def survival_records(confidence_logits, verify_lengths, accepted_lengths):
    """Stack the rounds of many sequences: (logits [M, G], labels [M, G], mask [M, G]).

    mask marks verified slots; each sequence's last round is dropped (a stop token or the
    token limit may have cut it short, so its unverified tail would read as rejected).
    """
    logits, labels, mask = [], [], []
    for conf, verified, accepted in zip(confidence_logits, verify_lengths, accepted_lengths):
        rounds = len(accepted) - 1
        if rounds <= 0:
            continue
        g = conf.shape[1]
        slot = np.arange(g)[None, :]
        logits.append(np.asarray(conf[:rounds], np.float64))
        labels.append(slot < np.asarray(accepted[:rounds])[:, None])
        mask.append(slot < np.asarray(verified[:rounds])[:, None])
    if not logits:
        raise ValueError("no complete speculative rounds to calibrate on")
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(mask)


def predicted_survival(logits: np.ndarray, temperatures: Sequence[float] | None = None) -> np.ndarray:
    """a [M, G] = cumulative product of sigmoid(c_j / T_j), in float64."""
    t = np.ones(logits.shape[1]) if temperatures is None else np.asarray(temperatures, np.float64)
    return np.cumprod(_sigmoid(logits / t), axis=1)


def ece(pred: np.ndarray, label: np.ndarray, mask: np.ndarray, bins: int = 20) -> np.ndarray:
    """Expected calibration error per position [G] (NaN where a position has no samples)."""
    out = np.full(pred.shape[1], np.nan)
    for j in range(pred.shape[1]):
        p, y = np.clip(pred[mask[:, j], j], 1e-8, 1 - 1e-8), label[mask[:, j], j]
        if len(p):
            out[j] = _ece_1d(p, y, bins)
    return out


def _ece_1d(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    """sum_b (n_b / n) |mean p_b - mean y_b| = sum_b |sum p_b - sum y_b| / n."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    gap = np.abs(np.bincount(idx, p, bins) - np.bincount(idx, y.astype(float), bins))
    return float(gap.sum() / len(p))


def auroc(pred: np.ndarray, label: np.ndarray, mask: np.ndarray, bins: int = 1000) -> np.ndarray:
    """Area under the ROC curve per position [G], from score histograms (ties count half)."""
    out = np.full(pred.shape[1], np.nan)
    for j in range(pred.shape[1]):
        p, y = pred[mask[:, j], j], label[mask[:, j], j]
        pos = np.bincount(np.minimum((p[y] * bins).astype(int), bins - 1), minlength=bins)
        neg = np.bincount(np.minimum((p[~y] * bins).astype(int), bins - 1), minlength=bins)
        if pos.sum() and neg.sum():
            below = np.cumsum(neg) - neg
            out[j] = float(np.sum(pos * (below + 0.5 * neg)) / (pos.sum() * neg.sum()))
    return out


def brier(pred: np.ndarray, label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean squared error of the survival prediction per position [G]."""
    err = (pred - label) ** 2
    counts = mask.sum(0)
    return np.where(counts > 0, (err * mask).sum(0) / np.maximum(counts, 1), np.nan)


def fit_sts(logits: np.ndarray, label: np.ndarray, mask: np.ndarray, grid: np.ndarray = STS_GRID) -> np.ndarray:
    """Sequential Temperature Scaling: temperatures [G] fitted left to right on these records."""
    temps = np.ones(logits.shape[1])
    prefix = np.ones(logits.shape[0])  # fitted survival up to position j - 1
    for j in range(logits.shape[1]):
        rows = mask[:, j]
        if rows.any():
            y = label[rows, j]
            errors = [_ece_1d(np.clip(prefix[rows] * _sigmoid(logits[rows, j] / t), 1e-8, 1 - 1e-8), y, 20)
                      for t in grid]
            temps[j] = grid[int(np.argmin(errors))]
        prefix = prefix * _sigmoid(logits[:, j] / temps[j])
    return temps


def save_sts(directory: str, temperatures: Sequence[float]) -> str:
    """Writes the STS temperatures beside a draft checkpoint; returns the file's path."""
    path = os.path.join(directory, STS_FILE)
    with open(path, "w") as f:
        json.dump({"temperatures": [float(t) for t in temperatures]}, f, indent=1)
    return path


def load_sts(directory: str) -> tuple[float, ...] | None:
    """The STS temperatures saved beside a draft checkpoint, or None if there are none."""
    path = os.path.join(directory, STS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return tuple(float(t) for t in json.load(f)["temperatures"])


def reliability_diagram(pred, label, mask, path: str, title: str = "", bins: int = 20) -> None:
    """One panel per position: mean predicted survival against the observed rate, per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = pred.shape[1]
    fig, axes = plt.subplots(1, g, figsize=(2.4 * g, 2.6), sharey=True, squeeze=False)
    for j, ax in enumerate(axes[0]):
        p, y = pred[mask[:, j], j], label[mask[:, j], j].astype(float)
        idx = np.minimum((p * bins).astype(int), bins - 1)
        n = np.bincount(idx, minlength=bins)
        seen = n > 0
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        ax.plot((np.bincount(idx, p, bins)[seen] / n[seen]), (np.bincount(idx, y, bins)[seen] / n[seen]),
                "o-", ms=3)
        ax.set_title(f"position {j + 1}", fontsize=9)
        ax.set_xlabel("predicted survival", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("observed", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
