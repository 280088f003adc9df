"""Offline scheduler simulation: replay recorded rounds against an SPS table.

A trace records, for rounds decoded with every draft token verified, the draft's confidence
logits [G] and the number of accepted tokens A. Acceptance is a prefix property (whether slot
j is accepted depends only on slots <= j), so verifying L tokens of such a round accepts
min(L, A) of them and commits min(L, A) + 1 tokens. Grouping the rounds R at a time gives
steps of a batch at concurrency R; a policy picks each step's lengths, and throughput is
committed tokens over the summed step times 1 / SPS(sum of (1 + L)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.scheduler import AsyncPrefixScheduler, PrefixScheduler, check_table


@dataclasses.dataclass
class Trace:
    confidence: np.ndarray  # [M, G] confidence logits per round
    accepted: np.ndarray  # [M] accepted draft tokens with all G verified

    def save(self, path: str) -> None:
        np.savez_compressed(path, confidence=self.confidence, accepted=self.accepted)

    @classmethod
    def load(cls, path: str) -> "Trace":
        with np.load(path) as z:
            return cls(z["confidence"], z["accepted"])


def trace_from_result(result) -> Trace:
    """Rounds of a fully verifying generation (each sequence's possibly cut-short last round dropped)."""
    conf, acc = [], []
    for c, verified, accepted in zip(result.confidence_logits, result.verify_lengths, result.accepted_lengths):
        n = len(accepted) - 1
        if n > 0:
            if any(v != c.shape[1] for v in verified[:n]):
                raise ValueError("a trace needs rounds that verified every draft token (no scheduler)")
            conf.append(np.asarray(c[:n], np.float32))
            acc.append(np.asarray(accepted[:n], np.int32))
    if not conf:
        raise ValueError("no complete rounds to build a trace from")
    return Trace(np.concatenate(conf), np.concatenate(acc))


def _steps(trace: Trace, concurrency: int) -> tuple[np.ndarray, np.ndarray]:
    """Rounds grouped into steps of `concurrency` requests: ([S, R, G], [S, R]), cycling the trace."""
    m = len(trace.accepted)
    n_steps = max(1, m // concurrency)
    idx = (np.arange(n_steps * concurrency) % m).reshape(n_steps, concurrency)
    return trace.confidence[idx], trace.accepted[idx]


def throughput(lengths: np.ndarray, accepted: np.ndarray, sps) -> float:
    """Committed tokens per second for chosen lengths [S, R] and full-verification accepts [S, R]."""
    sps = np.asarray(sps, np.float64)
    tokens = np.minimum(lengths, accepted).sum(1) + lengths.shape[1]
    batch = (1 + lengths).sum(1)
    seconds = 1.0 / sps[np.clip(batch - 1, 0, len(sps) - 1)]
    return float(tokens.sum() / seconds.sum())


def simulate(trace: Trace, sps, concurrency: int, temperatures=None) -> dict:
    """Throughput at one concurrency for no speculation, every fixed length, Algorithm 1
    (early stop), and the asynchronous variant."""
    curve = tuple(sps)
    if any(isinstance(x, (tuple, list)) for x in curve):  # a serving table's passes need the engine's row counts
        raise ValueError("sps: simulate takes one curve SPS(B), profile-sps's table of one concurrency, not a "
                         "serving table of one curve per row count")
    check_table(curve, None)
    curve = tuple(map(float, curve))
    conf, accepted = _steps(trace, concurrency)
    gamma = conf.shape[2]
    active = jnp.ones((concurrency,), bool)
    out = {"concurrency": concurrency, "fixed": {}}
    for length in range(gamma + 1):
        out["fixed"][length] = throughput(np.full(accepted.shape, length), accepted, sps)
    out["no_speculation"] = out["fixed"][0]
    out["best_fixed_length"] = max(out["fixed"], key=out["fixed"].get)
    out["best_fixed"] = out["fixed"][out["best_fixed_length"]]
    sync = PrefixScheduler(curve, temperatures)
    out["prefix"] = throughput(np.asarray(jax.vmap(lambda c: sync(c, active))(jnp.asarray(conf))), accepted, sps)
    async_ = AsyncPrefixScheduler(curve, temperatures)

    def step(state, c):
        lengths, state = async_.step(c, active, state)
        return state, lengths

    _, async_lengths = jax.lax.scan(step, async_.init_state(concurrency, gamma), jnp.asarray(conf))
    out["async"] = throughput(np.asarray(async_lengths), accepted, sps)
    return out
