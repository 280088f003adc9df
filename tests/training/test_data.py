"""Training data: chat rendering and loss masks, bad input, the grain pipeline, regeneration,
recipe overrides, the LR schedule and TensorBoard records."""

import copy
import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.crc32c import crc32c

from dspark_jax import load_target
from dspark_jax.data.conversations import Counts, DataError, load_examples, render
from dspark_jax.data.pipeline import collate, micro_batches
from dspark_jax.data.regenerate import regenerate_file
from dspark_jax.models.config import ConfigError
from dspark_jax.training.config import TrainConfig, load_config, override
from dspark_jax.training.optim import lr_schedule
from dspark_jax.training.trainer import write_scalars
from tests.training.tensorboard_records import read_records

CHAT = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}")
GEMMA = "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n" \
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
GEMMA4 = "{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n" \
         "{{ m['content'] }}<turn|>\n{% endfor %}"


def supervised_text(tokenizer, ids, mask) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def test_chatml_masks_exactly_the_answers_and_their_end_markers(tokenizer):
    ids, mask = render(tokenizer, CHAT, "chatml")
    assert supervised_text(tokenizer, ids, mask) == ["Paris.<|im_end|>\n", "Rome, since 1871.<|im_end|>\n"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its own system prompt
    ids_q, mask_q = render(tokenizer, CHAT, "qwen")  # qwen inserts DeepSpec's default system prompt
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in tokenizer.decode(ids_q)
    assert supervised_text(tokenizer, ids_q, mask_q) == supervised_text(tokenizer, ids, mask)


@pytest.mark.parametrize("template,jinja,markers,answers", [
    ("llama3", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     ["Paris.<|eot_id|>", "Rome, since 1871.<|eot_id|>"]),
    ("gemma", GEMMA, ["<start_of_turn>", "<end_of_turn>"], ["Paris.<end_of_turn>\n", "Rome, since 1871.<end_of_turn>\n"]),
    ("gemma4", GEMMA4, ["<|turn>", "<turn|>", "<|channel>", "<channel|>"],
     ["Paris.<turn|>\n", "Rome, since 1871.<turn|>\n"]),
])
def test_other_template_families(tokenizer, template, jinja, markers, answers):
    """SmolLM2's tokenizer with another family's template and its markers as special tokens,
    as they are in that family's own tokenizer."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = jinja
    tok.add_special_tokens({"additional_special_tokens": markers})
    ids, mask = render(tok, CHAT, template)
    assert supervised_text(tok, ids, mask) == answers
    if template == "gemma4":  # the empty thought channel is rendered but not supervised
        assert tok.decode(ids).count("<|turn>model\n<|channel>thought\n<channel|>Paris.") == 1


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_lines_are_skipped_counted_and_located(tokenizer, tmp_path):
    good = json.dumps({"messages": CHAT})
    path = write_lines(tmp_path / "train.jsonl", [
        good,
        '{"messages": [{"role": "user", "content": "unterminated',
        json.dumps({"turns": ["only a question"]}),
        json.dumps({"messages": [{"role": "narrator", "content": "x"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello! " * 400}]}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}]}),
        "",
    ])
    counts = Counts()
    examples = load_examples([path], tokenizer, template="auto", max_length=256, min_loss_tokens=4, counts=counts)
    assert (counts.lines, counts.malformed, counts.no_assistant, counts.too_few_loss_tokens) == (6, 2, 1, 1)
    assert counts.truncated == 1 and len(examples) == 2 and counts.examples == 2
    assert len(examples[1]["input_ids"]) == 256 and examples[1]["loss_mask"][-1]
    summary = counts.summary()
    assert f"{path}:2: invalid JSON" in summary
    assert f"{path}:3: no assistant turn" in summary
    assert f"{path}:4: message 0 needs a known role" in summary
    assert f"{path}:6: 3 supervised tokens < min_loss_tokens=4" in summary
    with pytest.raises(DataError, match=r"min_loss_tokens=1000 is the fewest answer tokens .* --set min_loss_tokens=N"):
        load_examples([path], tokenizer, template="auto", max_length=256, min_loss_tokens=1000)
    empty = write_lines(tmp_path / "empty.jsonl", [json.dumps({"turns": ["q"]})])
    with pytest.raises(DataError, match="no training examples in .*empty.jsonl"):
        load_examples([empty], tokenizer, template="auto", max_length=256, min_loss_tokens=4)


def fake_source(n):
    return [{"input_ids": np.full(3 + i % 5, i, np.int32), "loss_mask": np.ones(3 + i % 5, bool)} for i in range(n)]


def test_pipeline_is_deterministic_sharded_and_reshuffled_per_epoch():
    source = fake_source(24)
    one = micro_batches(source, batch_size=4, max_length=8, seed=5)
    again = micro_batches(source, batch_size=4, max_length=8, seed=5)
    ids = lambda ds, k: [int(row[0]) for row in ds[k]["input_ids"]]
    assert [ids(one, k) for k in range(12)] == [ids(again, k) for k in range(12)]
    epoch0 = sorted(sum((ids(one, k) for k in range(6)), []))
    epoch1 = sorted(sum((ids(one, k) for k in range(6, 12)), []))
    assert epoch0 == epoch1 == list(range(24))
    assert sum((ids(one, k) for k in range(6)), []) != sum((ids(one, k) for k in range(6, 12)), [])
    hosts = [micro_batches(source, batch_size=2, max_length=8, seed=5, host_index=h, host_count=2) for h in range(2)]
    seen = [set(sum((ids(d, k) for k in range(6)), [])) for d in hosts]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(24))


def test_collate_pads_right_and_keeps_lengths():
    batch = collate(fake_source(3), max_length=6)
    np.testing.assert_array_equal(batch["lengths"], [3, 4, 5])
    np.testing.assert_array_equal(batch["input_ids"][1], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][2], [1, 1, 1, 1, 1, 0])


def test_regenerate_answers_with_the_target_and_resumes(smollm2, tmp_path):
    prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"turns": ["What is the capital of France?"]})] * 2)
    out = str(tmp_path / "answers.jsonl")
    options = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, batch_size=2)
    regenerate_file(smollm2, prompts, out, chunk=1, limit=1, **options)
    with open(out, "a") as f:
        f.write('{"messages": [{"role": "us')  # a crash in the middle of the next line
    regenerate_file(smollm2, prompts, out, chunk=1, **options)  # drops that line, continues after the first
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 2
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"] == "The capital of France is Paris."


def test_regenerate_samples_several_answers_per_conversation(tiny_chat_target, tmp_path):
    """--samples 3 at T=1: three lines per conversation, in order, each its own draw (the same
    prompt twice in a file gives six different answers), and a file cut short after the first
    conversation's samples keeps them and is completed to six lines."""
    prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"turns": ["Name a colour."]})] * 2)
    out, again = str(tmp_path / "answers.jsonl"), str(tmp_path / "again.jsonl")
    options = dict(max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, batch_size=4, samples=3)
    target = load_target(tiny_chat_target, dtype="float32")
    regenerate_file(target, prompts, out, chunk=4, **options)
    regenerate_file(target, prompts, again, chunk=4, limit=1, **options)  # the first conversation's 3 lines
    first = open(again).read()
    regenerate_file(target, prompts, again, chunk=4, **options)  # continues after them
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 6 and all(r["messages"][0]["content"] == "Name a colour." for r in rows)
    answers = [r["messages"][1]["content"] for r in rows]
    assert len(set(answers)) == 6, answers
    resumed = open(again).read()
    assert resumed.startswith(first) and len(resumed.splitlines()) == 6 and len(first.splitlines()) == 3
    with pytest.raises(ValueError, match="samples must be at least 1"):
        regenerate_file(target, prompts, out, **{**options, "samples": 0})


def test_recipe_overrides_name_bad_keys(tmp_path):
    config = load_config("configs/demo_tiny.py", ["max_steps=7", "target_layer_ids=0,2", "confidence_with_markov=false"])
    assert (config.max_steps, config.target_layer_ids, config.confidence_with_markov) == (7, (0, 2), False)
    with pytest.raises(ConfigError, match="--set max_stepz: unknown config key"):
        override(config, ["max_stepz=3"])
    with pytest.raises(ConfigError, match="--set max_steps=many"):
        override(config, ["max_steps=many"])
    with pytest.raises(ConfigError, match="config key 'algorithm'"):
        override(config, ["algorithm=medusa"])
    with pytest.raises(ConfigError, match="'global_batch_size' \\(12\\) must be a multiple of 'micro_batch_size'"):
        TrainConfig(global_batch_size=12, micro_batch_size=8)
    bad = tmp_path / "recipe.py"
    bad.write_text("cfg = 1\n")
    with pytest.raises(ConfigError, match="must define `config = TrainConfig"):
        load_config(str(bad))


def test_lr_schedule_is_warmup_then_cosine():
    lr = lr_schedule(6e-4, total_steps=100, warmup_ratio=0.04)  # W = 4
    expected = [6e-4 * (s + 1) / 4 for s in range(4)] + [6e-4 * 0.5 * (1 + np.cos(np.pi * (s - 4) / 96))
                                                         for s in range(4, 100)]
    np.testing.assert_allclose([float(lr(s)) for s in range(100)], expected, rtol=1e-6, atol=1e-10)
    assert float(lr(4)) == pytest.approx(6e-4)


def test_tensorboard_records_are_framed_and_checksummed(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    writer = SummaryWriter(str(tmp_path))
    write_scalars(writer, 10, {"loss": 1.5, "tau": 2.25})
    writer.close()
    records = read_records(str(next(tmp_path.iterdir())))
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and struct.pack("<f", 2.25) in records[1]


def test_every_recipe_loads():
    recipes = sorted(glob.glob("configs/*.py"))
    assert len(recipes) == 16  # 12 reference recipes, 3 SmolLM2, the demo
    for path in recipes:
        config = load_config(path)
        assert config.algorithm == os.path.basename(path).split("_")[0] or path.endswith("demo_tiny.py")
    q14 = load_config("configs/dspark_qwen3_14b.py")
    assert (q14.target, q14.target_layer_ids, q14.mask_token_id) == ("Qwen/Qwen3-14B", (1, 10, 19, 28, 37), 151669)
    assert (q14.global_batch_size, q14.learning_rate, q14.max_length, q14.seed) == (512, 6e-4, 4096, 42)
    assert load_config("configs/eagle3_qwen3_4b.py").seed == 0
    g12 = load_config("configs/dflash_gemma4_12b.py")
    assert (g12.target, g12.target_layer_ids, g12.mask_token_id, g12.chat_template) == (
        "google/gemma-4-12B-it", (5, 17, 29, 41, 46), 4, "gemma4")
