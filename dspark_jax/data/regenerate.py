"""Regenerates the assistant turns of a conversation file with the target model itself.

Drafts learn the distribution they will be verified against, so DeepSpec retrains on answers
the target wrote (reference 6.3). Here that runs on this project's own decoding: every user
turn is answered in order, each answer conditioned on the regenerated history, original
assistant turns are discarded and system turns kept. Conversations are processed in chunks;
each finished chunk is appended to the output, and a rerun skips the conversations already
written, so an interrupted run loses at most one chunk.

    python -m dspark_jax regenerate --model smollm2 --input prompts.jsonl --output train.jsonl [--samples 2]
"""

from __future__ import annotations

import json
import logging
import os

from dspark_jax.data.conversations import Counts, read_jsonl
from dspark_jax.decoding.generate import generate

logger = logging.getLogger(__name__)


def answer_turns(target, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, batch_size: int, seed: int) -> list[list[dict]]:
    """The conversations with every assistant turn written by `target`."""
    tokenizer = target.tokenizer
    users = [[m for m in c if m["role"] != "assistant"] for c in conversations]
    done = [[m for m in c if m["role"] == "system"] for c in users]
    pending = [[m for m in c if m["role"] == "user"] for c in users]
    turn = 0
    while any(turn < len(p) for p in pending):
        active = [i for i, p in enumerate(pending) if turn < len(p)]
        for i in active:
            done[i].append(pending[i][turn])
        prompts = {i: tokenizer.apply_chat_template(done[i], tokenize=True, add_generation_prompt=True,
                                                    return_dict=False, enable_thinking=False) for i in active}
        order = sorted(active, key=lambda i: len(prompts[i]))  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            result = generate(target, None, [list(prompts[i]) for i in batch], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + turn * 100003 + start)
            for i, tokens in zip(batch, result.tokens):
                done[i].append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})
        turn += 1
    return done


def regenerate_file(target, input_path: str, output_path: str, *, chunk: int = 256, limit: int | None = None,
                    seed: int = 0, samples: int = 1, **sampling) -> Counts:
    """Writes {"messages": [...]} per conversation of input_path, answered by the target;
    `samples` answers per conversation (consecutive lines, each drawn with its own random
    stream: more training data from the same prompts, as DeepSpec's regeneration offers)."""
    if target.tokenizer is None:
        raise ValueError("the target has no tokenizer (and chat template) to render conversations")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    counts = Counts()
    conversations = [m for _, m in read_jsonl(input_path, counts)][:limit]
    conversations = [m for m in conversations for _ in range(samples)]
    written = 0
    if os.path.exists(output_path):
        with open(output_path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)  # drop a line cut short by a crash
            written = data[: data.rfind(b"\n") + 1].count(b"\n")
        logger.info(f"{output_path}: {written} conversations already written, continuing")
    for start in range(written, len(conversations), chunk):
        answered = answer_turns(target, conversations[start : start + chunk], seed=seed + start, **sampling)
        with open(output_path, "a", encoding="utf-8") as f:
            for messages in answered:
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        logger.info(f"{output_path}: {start + len(answered)} / {len(conversations)} conversations")
    counts.examples = len(conversations)
    return counts
