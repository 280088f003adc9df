"""What a request asks for: `SamplingParams` with vLLM's names, and what each step returns.

These are host-side request values (validated at construction, so a bad field is a
ValueError naming it before the engine sees the request). The engine turns them into the
per-row device arrays of `dspark_jax.sampling.SamplingParams`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


GREEDY_BELOW = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (as is any below GREEDY_BELOW, which float32 logits cannot
    divide by); top_k 0 and top_p 1.0 disable those filters; seed None draws
    one from the engine's own generator; max_tokens counts generated tokens (a final stop
    token included); stop_token_ids end a request in addition to the model's EOS ids, which
    ignore_eos leaves out."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        _require(_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0",
                 self.temperature)
        _require(_number(self.top_p) and 0 < np.float32(self.top_p) and self.top_p <= 1, "top_p",
                 "in (0, 1] (and > 0 in float32)", self.top_p)
        _require(_integer(self.top_k) and 0 <= self.top_k < 2**31, "top_k", "an integer in [0, 2**31)", self.top_k)
        _require(self.seed is None or (_integer(self.seed) and 0 <= self.seed < 2**32), "seed",
                 "None or an integer in [0, 2**32)", self.seed)
        _require(_integer(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _require(not isinstance(self.stop_token_ids, (str, bytes)) and all(
            _integer(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of token ids",
            self.stop_token_ids)
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


def _number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and np.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _require(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """Tokens a step committed for one request. finish_reason: "stop" (a stop or EOS token, the
    last of new_token_ids), "length" (max_tokens or the context limit), "abort"; None while
    running."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
