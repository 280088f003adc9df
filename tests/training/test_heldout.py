"""Held-out evaluation during training (`eval_files`): a curve in heldout.jsonl and TensorBoard,
from a tiny random Llama that renders conversations with SmolLM2's tokenizer (the
`tiny_chat_target` fixture); the run also exports a slim draft (`export_frozen=false`)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from dspark_jax import load_draft
from dspark_jax.checkpoints.safetensors_io import CheckpointError
from dspark_jax.models.config import ConfigError
from dspark_jax.training.config import load_config
from dspark_jax.training.trainer import evaluate_heldout, train
from tests.training.tensorboard_records import scalars


def counting(first: int, count: int) -> list[str]:
    """Conversations of one simple law (count on from a number), so held-out ones are learnable."""
    return [json.dumps({"messages": [{"role": "user", "content": f"Count on from {n}."},
                                     {"role": "assistant", "content": " ".join(str(n + k) for k in range(12))}]})
            for n in range(first, first + count)]


def test_heldout_curve_is_recorded_and_repeatable(tmp_path, tiny_chat_target):
    train_file, heldout_file = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train_file.write_text("\n".join(counting(0, 48)) + "\n")
    heldout_file.write_text("\n".join(counting(500, 20)) + "\n")
    config = load_config("configs/demo_tiny.py", [
        f"target={tiny_chat_target}", "chat_template=chatml", f"train_files={train_file}", f"eval_files={heldout_file}",
        "max_length=48", "num_anchors=8", "global_batch_size=8", "micro_batch_size=8", "max_steps=8",
        "eval_every=4", "log_every=1", "save_every=1000", "min_loss_tokens=4", "export_frozen=false",
        f"output_dir={tmp_path / 'run'}"])
    run = train(config, devices=jax.devices()[:1])
    with open(os.path.join(config.output_dir, "heldout.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [0, 4, 8]  # before training, every eval_every, at the end
    assert all(row["sequences"] == 16 for row in rows)  # 20 held-out conversations: two micro-batches of 8
    assert rows[-1]["loss"] < rows[1]["loss"] < rows[0]["loss"]  # the draft learns what the held-out set shares
    # One key for every evaluation, whatever the step: the same parameters give the same numbers.
    later = dataclasses.replace(run, state={**run.state, "step": run.state["step"] + 5})
    assert {"step": 8, **evaluate_heldout(later)} == pytest.approx(rows[-1], rel=1e-6)
    logged = scalars(os.path.join(config.output_dir, "tensorboard"))
    for row in rows:
        for key in ("loss", "tau_probabilistic", "accept_rate@0"):
            assert logged[(f"heldout/{key}", row["step"])] == pytest.approx(row[key], rel=1e-6)
    # export_frozen=false: the draft leaves out the embedding and LM head, and loads with its target
    path = os.path.join(config.output_dir, "draft")
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert "fc.weight" in names and not names & {"embed_tokens.weight", "lm_head.weight"}
    draft = load_draft(path, target=run.target, dtype="float32")
    assert draft.params["embed_tokens"] is run.target.params["embed_tokens"]
    np.testing.assert_array_equal(np.asarray(draft.params["fc"]),
                                  np.asarray(run.state["params"]["fc"].astype(jnp.bfloat16).astype(jnp.float32)))
    with pytest.raises(CheckpointError, match="missing tensor 'embed_tokens.weight'"):
        load_draft(path)  # without the target, nothing can stand in for them


def test_heldout_needs_the_online_target_and_a_valid_interval():
    with pytest.raises(ConfigError, match="'eval_files' needs target_mode 'online'"):
        load_config("configs/demo_tiny.py", ["eval_files=x.jsonl", "target_mode=offline", "cache_dir=c"])
    with pytest.raises(ConfigError, match="'eval_every' must be >= 0"):
        load_config("configs/demo_tiny.py", ["eval_every=-1"])
