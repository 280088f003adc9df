"""Conversations from JSONL, rendered with the tokenizer's chat template, with loss masks.

Accepted line formats (one JSON object per line):
- `{"messages": [{"role": ..., "content": ...}, ...]}` (also under "conversations", and the
  ShareGPT `{"from": ..., "value": ...}` spelling: human -> user, gpt/chatgpt/bing/bard -> assistant);
- DeepSpec prompt files `{"turns": ["...", ...]}`: every turn is a user turn (these need their
  answers generated first: see `dspark_jax.data.regenerate`).

Loss masks follow the reference (section 6.4): a token is supervised when it lies in an
assistant message, from right after the assistant header up to and including the end-of-turn
marker. The markers depend on the template family:
    qwen / chatml   <|im_start|>assistant\\n ... <|im_end|>\\n   (qwen adds the default system prompt)
    llama3          <|start_header_id|>assistant<|end_header_id|>\\n\\n ... <|eot_id|>
    gemma           <start_of_turn>model\\n ... <end_of_turn>\\n
    gemma4          <|turn>model\\n ... <turn|>\\n, each answer prefixed by an empty thought
                    channel that is rendered but not supervised.

Bad input never silently becomes a batch: malformed lines and conversations without an
assistant answer are skipped and counted (the first few reported with file and line), long
sequences are truncated to max_length and counted, and a conversation left with fewer than
min_loss_tokens supervised tokens is dropped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterator

import numpy as np

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class Template:
    header: str
    end: str
    default_system: str | None = None
    answer_prefix: str = ""  # rendered before every answer, not supervised


TEMPLATES = {
    "qwen": Template("<|im_start|>assistant\n", "<|im_end|>\n", default_system="You are a helpful assistant."),
    "chatml": Template("<|im_start|>assistant\n", "<|im_end|>\n"),
    "llama3": Template("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "gemma": Template("<start_of_turn>model\n", "<end_of_turn>\n"),
    "gemma4": Template("<|turn>model\n", "<turn|>\n", answer_prefix="<|channel>thought\n<channel|>"),
}


class DataError(ValueError):
    """A line or file that cannot become training data; the message names file and line."""


@dataclasses.dataclass
class Counts:
    """What reading a dataset skipped, truncated or dropped, with the first few reasons."""

    lines: int = 0
    malformed: int = 0
    no_assistant: int = 0
    truncated: int = 0
    too_few_loss_tokens: int = 0
    examples: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

    def skip(self, kind: str, where: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.reasons) < 5:
            self.reasons.append(f"{where}: {why}")

    def summary(self) -> str:
        text = (f"{self.examples} examples from {self.lines} lines; skipped {self.malformed} malformed, "
                f"{self.no_assistant} without an assistant answer, {self.too_few_loss_tokens} with too few "
                f"supervised tokens; truncated {self.truncated}")
        return "\n  ".join([text] + self.reasons)


def guess_template(tokenizer) -> str:
    """The template family of a tokenizer's chat template."""
    text = getattr(tokenizer, "chat_template", None) or ""
    for marker, name in (("<|turn>", "gemma4"), ("<start_of_turn>", "gemma"), ("<|start_header_id|>", "llama3")):
        if marker in text:
            return name
    if "<|im_start|>" in text:
        return "qwen" if "You are Qwen" in text or "<think>" in text else "chatml"
    raise DataError("cannot tell the chat-template family of this tokenizer; set chat_template in the config")


def messages_of(record, where: str) -> list[dict]:
    """The normalised [{"role", "content"}] of one JSON record; DataError if malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DataError(f"{where}: 'turns' must be a list of strings")
        return [{"role": "user", "content": t} for t in turns]
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: expected a non-empty 'messages', 'conversations' or 'turns' list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is not an object")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: message {i} needs a known role and a string content, got role {role!r}")
        out.append({"role": ROLES[role], "content": content})
    return out


def read_jsonl(path: str, counts: Counts) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) per valid line of a JSONL file; malformed lines are counted and skipped."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            counts.lines += 1
            where = f"{path}:{number}"
            try:
                yield where, messages_of(json.loads(line), where)
            except json.JSONDecodeError as e:
                counts.skip("malformed", where, f"invalid JSON ({e.msg})")
            except DataError as e:
                counts.skip("malformed", where, str(e).removeprefix(where + ": "))


def render(tokenizer, messages: list[dict], template: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [S], loss_mask bool [S]) of one conversation (see the module doc)."""
    spec = TEMPLATES[template]
    if spec.default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": spec.default_system}] + messages
    if spec.answer_prefix:
        messages = [{**m, "content": spec.answer_prefix + m["content"]} if m["role"] == "assistant" else m
                    for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    spans = []
    pattern = re.escape(spec.header) + "(.*?)" + re.escape(spec.end)
    for match in re.finditer(pattern, text, flags=re.DOTALL):
        start = match.start(1)
        if spec.answer_prefix and text.startswith(spec.answer_prefix, start):
            start += len(spec.answer_prefix)
        spans.append((start, match.end()))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in encoded["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return ids, mask


def load_examples(paths, tokenizer, *, template: str, max_length: int, min_loss_tokens: int,
                  counts: Counts | None = None) -> list[dict]:
    """Tokenised training examples {"input_ids", "loss_mask"} of JSONL conversation files."""
    counts = Counts() if counts is None else counts
    if template == "auto":
        template = guess_template(tokenizer)
    examples = []
    for path in paths:
        for where, messages in read_jsonl(path, counts):
            if not any(m["role"] == "assistant" for m in messages):
                counts.skip("no_assistant", where, "no assistant turn (generate answers first)")
                continue
            ids, mask = render(tokenizer, messages, template)
            if len(ids) > max_length:
                counts.truncated += 1
                ids, mask = ids[:max_length], mask[:max_length]
            if mask.sum() < min_loss_tokens:
                counts.skip("too_few_loss_tokens", where,
                            f"{int(mask.sum())} supervised tokens < min_loss_tokens={min_loss_tokens}")
                continue
            examples.append({"input_ids": ids, "loss_mask": mask})
    counts.examples = len(examples)
    if not examples:
        hint = ""
        if counts.too_few_loss_tokens:
            hint = (f" (min_loss_tokens={min_loss_tokens} is the fewest answer tokens a conversation needs to be "
                    f"trained on; lower it with --set min_loss_tokens=N)")
        raise DataError(f"no training examples in {list(paths)}{hint}: {counts.summary()}")
    return examples
