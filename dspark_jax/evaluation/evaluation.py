"""The reference evaluation protocol: prompt sets, and acceptance statistics of generations.

Prompt files hold one JSON object per line with "turns" (DeepSpec's format); only the first
user turn is used, rendered with the tokenizer's chat template (generation prompt added, no
system turn of our own). Each set is capped as in the reference (gsm8k and math500 500,
aime25 30, humaneval 164, mbpp 256, livecodebench 500, mt-bench 80, alpaca 500,
arena-hard 500); a longer file is shuffled with random.Random(980406) before capping.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from dspark_jax.data.conversations import Counts, DataError, read_jsonl
from dspark_jax.decoding.batching import bucket
from dspark_jax.checkpoints.deepspec import load_draft
from dspark_jax.decoding.generate import GenerationResult, generate
from dspark_jax.models.draft import Draft
from dspark_jax.models.draft_config import draft_config_for_target, spread_layer_ids

CAPS = {"gsm8k": 500, "math500": 500, "aime25": 30, "humaneval": 164, "mbpp": 256, "livecodebench": 500,
        "mt-bench": 80, "alpaca": 500, "arena-hard": 500}
SEED = 980406


def draft_from_spec(spec: str, target, dtype: str) -> Draft:
    """A DeepSpec draft directory, or random:<dspark|dflash|eagle3> (random weights over the
    target's spread layers, for pipeline checks), on the target's mesh."""
    if spec.startswith("random:"):
        algorithm = spec.split(":", 1)[1]
        ids = spread_layer_ids(target.config.num_layers)
        config = draft_config_for_target(target.config, algorithm, ids, mask_token_id=target.config.vocab_size - 1)
        return Draft.random(config, target=target, dtype=dtype, mesh=target.mesh)
    return load_draft(spec, target=target, dtype=dtype, mesh=target.mesh)


def load_prompts(path: str, cap: int | None = None, counts: Counts | None = None) -> list[str]:
    """First user turns of a prompt file ({"turns": [...]} records, or conversations). Lines
    that are not records, or have no user turn, are skipped and counted in `counts` with their
    file and line, as training data is; a file without a single prompt is a DataError."""
    name = os.path.splitext(os.path.basename(path))[0]
    cap = CAPS.get(name) if cap is None else cap
    counts = Counts() if counts is None else counts
    prompts = []
    for where, messages in read_jsonl(path, counts):
        first = next((m["content"] for m in messages if m["role"] == "user"), None)
        if first is None or not first.strip():
            counts.skip("malformed", where, "no user turn to use as the prompt")
            continue
        prompts.append(first)
    counts.examples = len(prompts)
    if not prompts:
        raise DataError(f"no prompts in {path}: {skipped_lines(counts)}")
    if cap is not None and len(prompts) > cap:
        random.Random(SEED).shuffle(prompts)
        prompts = prompts[:cap]
    return prompts


def skipped_lines(counts: Counts) -> str:
    """What reading a prompt file skipped, with the first few places and reasons."""
    return "; ".join([f"skipped {counts.malformed} of {counts.lines} lines"] + counts.reasons)


def chat_ids(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Token ids of single-turn chats ending in the assistant's generation prompt, after a
    system message if one is given (otherwise the template's own default, if any)."""
    head = [{"role": "system", "content": system}] if system else []
    return [conversation_ids(tokenizer, head + [{"role": "user", "content": p}]) for p in prompts]


def conversation_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a chat [{"role", "content"}, ...] ending in the assistant's generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)


def acceptance_stats(result: GenerationResult, gamma: int) -> dict:
    """Reference metrics over all rounds of all sequences.

    tau: tokens committed per round (bonus included); mean_verified: draft tokens sent to the
    target per round; verify_rate: committed / (verified + rounds); accept_rate[j]: rounds
    accepting more than j drafts over rounds verifying more than j (prefix survival);
    conditional[j]: accept_rate[j] / accept_rate[j - 1], the acceptance of slot j given all
    earlier slots were accepted (the paper's Figure 2).
    """
    verified = np.concatenate([np.asarray(v, int) for v in result.verify_lengths]) if result.verify_lengths else []
    accepted = np.concatenate([np.asarray(a, int) for a in result.accepted_lengths]) if result.accepted_lengths else []
    rounds = len(accepted)
    committed = sum(max(len(t) - 1, 0) for t, a in zip(result.tokens, result.accepted_lengths) if len(a))
    slot = np.arange(gamma)
    reached = (accepted[:, None] > slot).sum(0) if rounds else np.zeros(gamma)
    offered = (verified[:, None] > slot).sum(0) if rounds else np.zeros(gamma)
    accept_rate = np.where(offered > 0, reached / np.maximum(offered, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where no round got that far
        conditional = accept_rate / np.concatenate([[1.0], accept_rate[:-1]])
    return {
        "rounds": int(rounds),
        "generated_tokens": int(sum(len(t) for t in result.tokens)),
        "tau": committed / rounds if rounds else float("nan"),
        "mean_verified": float(np.mean(verified)) if rounds else float("nan"),
        "verify_rate": committed / (float(np.sum(verified)) + rounds) if rounds else float("nan"),
        "accept_rate": accept_rate.tolist(),
        "conditional_acceptance": conditional.tolist(),
    }


def merge_results(results: Sequence[GenerationResult]) -> GenerationResult:
    """One GenerationResult from several batches."""
    return GenerationResult(
        tokens=[t for r in results for t in r.tokens],
        verify_lengths=[v for r in results for v in r.verify_lengths],
        accepted_lengths=[a for r in results for a in r.accepted_lengths],
        confidence_logits=[c for r in results for c in r.confidence_logits],
    )


def json_ready(value):
    """`value` with every NaN or infinity replaced by None, so json.dumps(..., allow_nan=False)
    writes valid JSON (null) instead of NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def timed_generate(target, draft, prompts: Sequence[Sequence[int]], *, batch_size: int, progress: str | None = None,
                   seed: int = SEED, **kwargs) -> tuple[GenerationResult, float]:
    """`generate` over consecutive batches of prompts: (merged result, seconds). Batch i is
    seeded seed + i; the first batch of each padded shape runs once untimed beforehand, so
    compilation is not counted. With `progress`, a progress bar of that title counts the
    prompts on stderr. kwargs go to `generate`."""
    seen, results, seconds = set(), [], 0.0
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None, dynamic_ncols=True,
               leave=False)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        call = lambda: generate(target, draft, batch, seed=seed + i, **kwargs)
        shape = (bucket(len(batch), 1), bucket(max(map(len, batch))))
        if shape not in seen:
            seen.add(shape)
            call()
        start = time.perf_counter()
        results.append(call())
        seconds += time.perf_counter() - start
        bar.update(len(batch))
    bar.close()
    return merge_results(results), seconds
