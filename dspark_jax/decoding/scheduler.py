"""Verify-length schedulers: how many of each sequence's draft tokens the target checks.

A scheduler maps the draft's confidence logits [B, G] (logit of slot j's conditional
acceptance given slots < j accepted) and the active mask [B] to verify lengths [B] in [0, G].
Every scheduler here is non-anticipating: whether slot j is verified depends only on
information available before slot j's token was drawn, so speculative decoding stays exact.

- `PrefixScheduler`: the paper's Algorithm 1. Prefix survival a_{r,j} = prod_{i<=j} sigmoid(
  c_{r,i} / T_i) (T from Sequential Temperature Scaling, 1 by default); candidates are admitted
  in descending a, a batch of B verify tokens running at SPS(B) steps/s, as long as the
  expected throughput tau * SPS(B) keeps rising; the first drop stops the search. (Without
  that early stop the search peeks at later slots, whose confidence depends on earlier
  sampled tokens, and biases the output: the paper's Appendix A. `early_stop=False` exists
  only to demonstrate that bias.)
- `AsyncPrefixScheduler`: the paper's section 5.2. The token budget K comes from an
  unconstrained (global maximum) search over confidences of two rounds earlier; the current
  round admits its K most confident candidates. K is fixed before this round's tokens exist,
  so the global search is safe.
- `ThresholdScheduler`: verify up to the first slot whose sigmoid(c_j) is below a threshold
  (the static baseline of the paper's Figure 5).
- `FixedScheduler`: verify the first g draft tokens of every row, whatever the confidences
  (the fixed-gamma baselines of the paper's Figure 7; the verify pass is then g + 1 tokens wide,
  not the whole block's).

A table is the paper's one curve, sps[B - 1] steps/s at B verify tokens (measured at one
concurrency), or a serving engine's table (`sps_rows` given): sps[i][w - 1] steps/s of
sps_rows[i] rows verifying w tokens each, so that a round's price depends on how many rows
carry its tokens (at a fixed B, fewer rows read less of the KV cache). The engine's
concurrency changes from step to step, and one curve over B would mix passes of different
row counts.

The SPS table counts the target's time only. When the draft's own pass is a real share of a
round (a small target, a weak draft, a large batch), speculating can lose to plain decoding
whatever the verify lengths. Given the draft's seconds per round (`draft_seconds`, by row
count: its pass, or for a serving engine what a drafted round costs beyond its verify pass,
`serving.round_times`), `speculation_pays` decides before a round is drafted whether it should be: it
prices the round the scheduler would run on the confidences of the last round drafted (its
expected tokens, its verify pass as wide as it runs, the draft's pass) against an
autoregressive step's (r rows at SPS(r)). A caller that measures how far the confidences
over- or under-forecast scales the expected tokens (`forecast_scale`), and may give the
confidences a row without any drafted round counts as (`fallback`); a serving engine does both.
The decision uses only earlier rounds, so it never biases the output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from typing import Sequence

import jax
import jax.numpy as jnp


CONFIDENT = 30.0  # a confidence logit standing for "surely accepted" (sigmoid(30) ~ 1)


def survival(conf_logits: jax.Array, temperatures: Sequence[float] | None) -> jax.Array:
    """Prefix survival a [B, G] = cumulative product of sigmoid(c_j / T_j)."""
    c = conf_logits.astype(jnp.float32)
    if temperatures is not None:
        c = c / jnp.asarray(temperatures, jnp.float32)[: c.shape[1]]
    return jnp.cumprod(jax.nn.sigmoid(c), axis=1)


def check_table(sps, sps_rows) -> None:
    """Raises a ValueError naming the key unless (sps, sps_rows) is a table of the module doc."""
    def rate(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and 0 < x < math.inf

    if sps_rows is None:
        if not sps or not all(rate(x) for x in sps):
            raise ValueError("sps: expected a non-empty list of positive finite steps/s, one per verify token count "
                             "(a list of curves needs sps_rows)")
        return
    if (not sps_rows or len(sps_rows) != len(sps) or not all(isinstance(n, numbers.Integral)
                                                              and not isinstance(n, bool) for n in sps_rows)
            or list(sps_rows) != sorted(set(sps_rows)) or sps_rows[0] < 1):
        raise ValueError(f"sps_rows: expected increasing integer row counts >= 1, one per curve of sps "
                         f"({len(sps)} curves), got {list(sps_rows)}")
    if any(not isinstance(curve, (tuple, list)) or len(curve) != len(sps[0]) or not curve
           or not all(rate(x) for x in curve) for curve in sps):
        raise ValueError("sps: with sps_rows, expected one list of positive finite steps/s per row count (w = 1, 2, "
                         "... tokens per row), all of the same length")


def _rates(scheduler, rows: jax.Array, tokens: jax.Array) -> jax.Array:
    """Steps/s of a verify pass of `tokens` tokens (an array) carried by `rows` (a scalar) active rows, from
    the scheduler's table: the paper's curve sps[B - 1] (the last entry for larger B), or a
    serving table read at w = tokens / rows tokens per row, its seconds interpolated linearly
    in w and then in the row count (flat outside the measured counts)."""
    sps = jnp.asarray(scheduler.sps, jnp.float32)
    if scheduler.sps_rows is None:
        return sps[jnp.clip(tokens - 1, 0, sps.shape[0] - 1)]
    seconds = 1.0 / sps  # [C, W]: C measured row counts, w = 1..W tokens per row
    count, w_max = seconds.shape
    r = jnp.maximum(rows, 1).astype(jnp.float32)
    width = jnp.clip(tokens / r, 1.0, w_max)
    lo = jnp.floor(width).astype(jnp.int32)
    f = width - lo
    per_count = seconds[:, lo - 1] * (1 - f) + seconds[:, jnp.minimum(lo, w_max - 1)] * f  # [C, *tokens.shape]
    if count == 1:
        return 1.0 / per_count[0]
    counts = jnp.asarray(scheduler.sps_rows, jnp.float32)
    i = jnp.clip(jnp.searchsorted(counts, r), 1, count - 1)  # counts[i - 1] < r <= counts[i] inside the range
    g = jnp.clip((r - counts[i - 1]) / (counts[i] - counts[i - 1]), 0.0, 1.0)
    return 1.0 / (per_count[i - 1] * (1 - g) + per_count[i] * g)


def _admission_order(a: jax.Array, active: jax.Array):
    """Flattened candidates sorted by descending survival (ties: earlier slot first).

    Returns (order [B*G] into the flattened [B, G], sorted survival, valid mask).
    """
    b, g = a.shape
    a = jnp.where(active[:, None], a, 0.0)
    slot = jnp.broadcast_to(jnp.arange(g), (b, g)).reshape(-1)
    order = jnp.lexsort((slot, -a.reshape(-1)))  # primary key last: -a, then slot
    a_sorted = a.reshape(-1)[order]
    return order, a_sorted, a_sorted > 0


def _expected_tokens(a_sorted, valid, active) -> tuple[jax.Array, jax.Array, jax.Array]:
    """After admitting 0, 1, ..., B*G candidates in order, each [B*G + 1]: expected tokens a
    round commits (one per active row plus the admitted survivals), tokens the target
    verifies, and whether that many candidates exist."""
    r = jnp.sum(active)
    n = a_sorted.shape[0]
    tau = r.astype(jnp.float32) + jnp.concatenate([jnp.zeros(1), jnp.cumsum(jnp.where(valid, a_sorted, 0.0))])
    return tau, r + jnp.arange(n + 1), jnp.concatenate([jnp.ones(1, bool), valid])


def _throughputs(a_sorted, valid, active, scheduler) -> jax.Array:
    """Expected throughput after admitting 0, 1, ..., B*G candidates in order: [B*G + 1]."""
    tau, tokens, exists = _expected_tokens(a_sorted, valid, active)
    return jnp.where(exists, tau * _rates(scheduler, jnp.sum(active), tokens), -jnp.inf)


def _lengths(order, admitted_sorted, shape) -> jax.Array:
    """Per-sequence count of admitted candidates (a prefix of its slots, by construction)."""
    admitted = jnp.zeros(order.shape, bool).at[order].set(admitted_sorted)
    return jnp.sum(admitted.reshape(shape), axis=1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PrefixScheduler:
    """Algorithm 1 over a profiled table: sps[B - 1] = target steps per second at B verify
    tokens, or with sps_rows a serving table (module doc); draft_seconds[r - 1] = seconds the
    draft adds to a round of r rows (optional: lets `speculation_pays` skip drafting when it
    does not pay)."""

    sps: tuple[float, ...] | tuple[tuple[float, ...], ...]
    temperatures: tuple[float, ...] | None = None
    early_stop: bool = True
    draft_seconds: tuple[float, ...] | None = None
    sps_rows: tuple[int, ...] | None = None

    def __post_init__(self):
        check_table(self.sps, self.sps_rows)

    def __call__(self, conf_logits: jax.Array, active: jax.Array) -> jax.Array:
        a = survival(conf_logits, self.temperatures)
        order, a_sorted, valid = _admission_order(a, active)
        theta = _throughputs(a_sorted, valid, active, self)
        if self.early_stop:
            rising = theta[1:] > theta[:-1]
            count = jnp.sum(jnp.cumprod(rising.astype(jnp.int32)))  # admit until the first drop
        else:
            count = jnp.argmax(theta)  # global maximum: looks at later slots (biased)
        return _lengths(order, jnp.arange(order.shape[0]) < count, a.shape)


@dataclasses.dataclass(frozen=True)
class AsyncPrefixScheduler:
    """Budget from confidences two rounds old, then top-K of the current candidates.

    Stateful across rounds: `init_state(batch, gamma)` then `(lengths, state) = step(...)`.
    The table and draft_seconds as in `PrefixScheduler`.
    """

    sps: tuple[float, ...] | tuple[tuple[float, ...], ...]
    temperatures: tuple[float, ...] | None = None
    draft_seconds: tuple[float, ...] | None = None
    sps_rows: tuple[int, ...] | None = None

    def __post_init__(self):
        check_table(self.sps, self.sps_rows)

    def init_state(self, batch: int, gamma: int) -> tuple[jax.Array, jax.Array]:
        """No history yet: budgets from an all-confident past (verify everything)."""
        full = jnp.full((batch, gamma), CONFIDENT, jnp.float32)
        return full, full

    def step(self, conf_logits, active, state):
        older, old = state
        _, past_sorted, past_valid = _admission_order(survival(older, self.temperatures), active)
        budget = jnp.argmax(_throughputs(past_sorted, past_valid, active, self))
        order, _, valid = _admission_order(survival(conf_logits, self.temperatures), active)
        admitted = (jnp.arange(order.shape[0]) < budget) & valid
        return _lengths(order, admitted, conf_logits.shape), (old, conf_logits.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class ThresholdScheduler:
    """Verify slots up to (excluding) the first with sigmoid(c_j / T_j) < threshold."""

    threshold: float
    temperatures: tuple[float, ...] | None = None

    def __call__(self, conf_logits: jax.Array, active: jax.Array) -> jax.Array:
        c = conf_logits.astype(jnp.float32)
        if self.temperatures is not None:
            c = c / jnp.asarray(self.temperatures, jnp.float32)[: c.shape[1]]
        ok = jax.nn.sigmoid(c) >= self.threshold
        return jnp.where(active, jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1), 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class FixedScheduler:
    """Verify min(gamma, G) draft tokens of every active row (no confidence head needed)."""

    gamma: int
    needs_confidence: typing.ClassVar[bool] = False

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"a fixed verify length must be >= 1, got {self.gamma}")

    def __call__(self, conf_logits: jax.Array, active: jax.Array) -> jax.Array:
        return jnp.where(active, min(self.gamma, conf_logits.shape[1]), 0).astype(jnp.int32)


def verify_widths(gamma: int, scheduler) -> list[int]:
    """Widths of a round's verify pass (tokens per row; a round runs the smallest that holds
    every row's 1 + L): with a confidence scheduler, the powers of two up to gamma + 1, so
    shorter verification is also cheaper; with a fixed verify length g, exactly g + 1; with
    none, gamma + 1."""
    if scheduler is None:
        return [gamma + 1]
    if isinstance(scheduler, FixedScheduler):
        return [min(scheduler.gamma, gamma) + 1]
    return sorted({min(1 << i, gamma + 1) for i in range(1, (gamma + 1).bit_length() + 1)})


def speculation_pays(scheduler, last_conf: jax.Array, active: jax.Array, scheduler_state=None,
                     forecast_scale=1.0, fallback=None) -> jax.Array:
    """Whether the next round should draft (bool scalar): always, unless the scheduler knows
    the draft's cost (`draft_seconds[r - 1]` for r rows). Then the round the scheduler would
    run on last_conf [B, G] (the confidences of each row's last drafted round; NaN for a row
    that has not drafted yet, which counts as the mean of the active rows that have, or when
    none has as `fallback` [G], confidences the caller keeps from earlier rows, or as sure
    acceptance without them: None or NaN) is priced as it runs:
    - its verify lengths L as the scheduler picks them (the asynchronous one with the budget its
      `scheduler_state`, required for it, already fixes);
    - E = r + forecast_scale x the survivals they admit expected tokens. forecast_scale (a
      scalar) is how many draft tokens rounds have accepted per token their confidences
      forecast: 1 trusts the confidences; a serving engine measures it (`Engine`);
    - a verify pass r * w tokens wide (w: the smallest verify width holding max(L) + 1), plus
      the draft's pass.
    Drafting pays when E / (1 / SPS(r * w) + draft) beats an autoregressive step's r * SPS(r),
    both SPS read for r rows (`_rates`). Both sides count the r active rows only, not a
    batch's padding rows; the autoregressive side leaves out the draft's small pass that takes
    in the new position unless the table is calibrated to the engine's undrafted rounds
    (`serving.round_times`). With no active row: True."""
    if getattr(scheduler, "draft_seconds", None) is None:
        return jnp.asarray(True)
    known = ~jnp.isnan(last_conf[:, :1])  # [B, 1] rows that have drafted before
    seen = active[:, None] & known
    mean = jnp.sum(jnp.where(seen, last_conf, 0.0), axis=0) / jnp.maximum(jnp.sum(seen), 1)  # [G]
    fallback = CONFIDENT if fallback is None else jnp.where(jnp.isnan(fallback), CONFIDENT, fallback)
    prior = jnp.where(jnp.any(seen), mean, fallback)  # [G]
    last_conf = jnp.where(known, last_conf, prior[None, :])
    if isinstance(scheduler, AsyncPrefixScheduler):  # the budget from confidences two rounds old
        length, _ = scheduler.step(last_conf, active, scheduler_state)
    else:
        length = scheduler(last_conf, active)
    length = jnp.where(active, length, 0)
    g = last_conf.shape[1]
    a = survival(last_conf, scheduler.temperatures)  # [B, G]
    r = jnp.sum(active)
    expected = r + forecast_scale * jnp.sum(jnp.where(jnp.arange(g)[None, :] < length[:, None], a, 0.0))
    widths = jnp.asarray(verify_widths(g, scheduler))
    width = widths[jnp.searchsorted(widths, jnp.max(length) + 1)]
    draft = jnp.asarray(scheduler.draft_seconds, jnp.float32)[jnp.clip(r - 1, 0, len(scheduler.draft_seconds) - 1)]
    speculative = expected / (1.0 / _rates(scheduler, r, r * width) + draft)
    return (r == 0) | (speculative > r * _rates(scheduler, r, r))


def scheduler_from_table(kind: str, table: dict, temperatures=None):
    """A "prefix" or "async" scheduler over an SPS table: {"sps": [...]} (the paper's curve) or
    {"sps_rows": [...], "sps": [[...], ...]} (a serving table), with its draft_seconds if any."""
    draft = tuple(float(x) for x in table["draft_seconds"]) if table.get("draft_seconds") else None
    cls = PrefixScheduler if kind == "prefix" else AsyncPrefixScheduler
    if table.get("sps_rows") is None:
        return cls(tuple(float(x) for x in table["sps"]), temperatures, draft_seconds=draft)
    return cls(tuple(tuple(float(x) for x in curve) for curve in table["sps"]), temperatures, draft_seconds=draft,
               sps_rows=tuple(int(r) for r in table["sps_rows"]))


def scheduler_from_spec(spec: str, temperatures=None):
    """A scheduler from its command-line spelling: none | fixed:<g> | threshold:<t> |
    prefix:<sps.json> | async:<sps.json> (an SPS table written by `python -m dspark_jax profile-sps`, with the draft's
    seconds per pass when it has them); None for none."""
    if spec == "none":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"--scheduler {spec!r}: fixed takes a verify length >= 1 (fixed:3)")
        return FixedScheduler(int(arg))
    if kind == "threshold":
        try:
            threshold = float(arg)
        except ValueError:
            raise ValueError(f"--scheduler {spec!r}: the threshold must be a number") from None
        return ThresholdScheduler(threshold, temperatures)
    if kind in ("prefix", "async"):
        with open(arg) as f:
            table = json.load(f)
        if not isinstance(table, dict) or "sps" not in table:
            raise ValueError(f"{arg}: an SPS table needs an 'sps' list (python -m dspark_jax profile-sps writes one)")
        return scheduler_from_table(kind, table, temperatures)
    raise ValueError(f"--scheduler {spec!r}: expected none, fixed:<g>, threshold:<t>, prefix:<sps.json> or "
                     "async:<sps.json>")
