"""`dspark_jax.generate`: speculative decoding with any drafter, or plain autoregressive decoding.

Output is what the target alone would produce: token for token at temperature 0, and in
distribution otherwise (see `dspark_jax.decoding.rejection`). Identical seeds give identical
outputs; every row of a batch draws its own randomness, so identical prompts give
independent samples.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.autoregressive import generate_autoregressive
from dspark_jax.decoding.batching import bucket, check_prompts, pad_prompts
from dspark_jax.sampling import SamplingParams
from dspark_jax.decoding.speculative import speculative_loop


@dataclasses.dataclass
class GenerationResult:
    """tokens[i]: generated ids of prompt i (prompt excluded, a final stop token included).

    Per speculative round of prompt i: verify_lengths[i][r] draft tokens were sent to the
    target and accepted_lengths[i][r] of them accepted; the round committed accepted + 1
    tokens (the residual or bonus token), or just the accepted ones when one was a stop token
    or max_new_tokens cut the round short. confidence_logits[i] is [rounds, gamma], the
    draft's confidence logits of each round (zeros without a confidence head). All are empty
    for autoregressive decoding.
    """

    tokens: list[list[int]]
    verify_lengths: list[list[int]]
    accepted_lengths: list[list[int]]
    confidence_logits: list[np.ndarray]

    @property
    def acceptance_length(self) -> float:
        """tau: tokens committed per round, bonus tokens included; the first token (sampled at
        prefill) is not counted. NaN without rounds."""
        rounds = sum(len(r) for r in self.accepted_lengths)
        committed = sum(max(len(t) - 1, 0) for t, r in zip(self.tokens, self.accepted_lengths) if r)
        return committed / rounds if rounds else float("nan")


def check_draft(target, draft) -> None:
    """A clear error when a draft was not built for this target."""
    t, d = target.config, draft.config
    problems = []
    if d.layers.vocab_size != t.vocab_size:
        problems.append(f"vocabulary {d.layers.vocab_size} != target's {t.vocab_size}")
    if d.layers.hidden_size != t.hidden_size:
        problems.append(f"hidden size {d.layers.hidden_size} != target's {t.hidden_size}")
    if d.num_target_layers != t.num_layers or d.target_layer_ids[-1] >= t.num_layers:
        problems.append(
            f"tapped layers {list(d.target_layer_ids)} of a {d.num_target_layers}-layer target, "
            f"but the target has {t.num_layers} layers"
        )
    if problems:
        raise ValueError("draft does not match the target: " + "; ".join(problems))


def generate(
    target,
    draft,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    scheduler=None,
    stop_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Generates a continuation of each prompt (lists of token ids).

    draft=None decodes autoregressively. scheduler (a `dspark_jax.decoding.scheduler`
    object) picks per-sequence verify lengths from the draft's confidence head; None verifies
    every draft token. Sampling (temperature 0 = greedy, top-k, top-p) is applied identically
    to target and draft. stop_ids default to the target config's EOS ids.
    """
    sampling = SamplingParams(temperature, top_k, top_p)
    cfg = target.config
    stop_ids = tuple(cfg.eos_token_ids if stop_ids is None else stop_ids)
    if draft is None:
        if scheduler is not None:
            raise ValueError("a scheduler needs a draft")
        tokens = generate_autoregressive(
            target, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids
        )
        return GenerationResult(tokens, [[] for _ in tokens], [[] for _ in tokens],
                                [np.zeros((0, 0), np.float32) for _ in tokens])
    check_draft(target, draft)
    if scheduler is not None and not draft.config.confidence_head:
        raise ValueError(f"a scheduler needs a draft with a confidence head ({draft.config.algorithm} has none)")
    gamma = draft.config.block_size
    check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings - gamma - 1, max_new_tokens)
    tokens, lengths = pad_prompts(prompts)
    out, count, verify_lengths, accepted, confidences, rounds = speculative_loop(
        target, draft, target.params, draft.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
        max_new_tokens=max_new_tokens, cache_length=bucket(tokens.shape[1] + max_new_tokens + 2 * gamma + 2),
        sampling=sampling, stop_ids=stop_ids, scheduler=scheduler,
    )
    out, count, verify_lengths, accepted, confidences, rounds = map(
        np.asarray, (out, count, verify_lengths, accepted, confidences, rounds))
    n = len(prompts)
    return GenerationResult(
        tokens=[out[i, : count[i]].tolist() for i in range(n)],
        verify_lengths=[verify_lengths[i, : rounds[i]].tolist() for i in range(n)],
        accepted_lengths=[accepted[i, : rounds[i]].tolist() for i in range(n)],
        confidence_logits=[confidences[i, : rounds[i]] for i in range(n)],
    )
