"""Bad checkpoints fail with errors that name the file or tensor and the expected shape."""

import json
import os
import shutil

import chex
import numpy as np
import pytest

from dspark_jax import load_target
from dspark_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, save_file
from dspark_jax.models.config import ConfigError
from tests.helpers import tiny_path

NAME = "qwen3_gqa_untied"


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of a tiny checkpoint and its tensors as numpy arrays."""
    path = str(tmp_path / "model")
    shutil.copytree(tiny_path(NAME), path)
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(f.array(k)) for k in f.keys()}
    return path, tensors


def _rewrite(path, tensors):
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such file or directory: /nonexistent/model"):
        load_target("/nonexistent/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_target(str(tmp_path))


def test_unknown_architecture(ckpt):
    path, _ = ckpt
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match=r"unknown architecture .*MambaForCausalLM"):
        load_target(path)


def test_missing_config_key(ckpt):
    path, _ = ckpt
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    del cfg["intermediate_size"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match=r"config.json: missing required key 'intermediate_size'"):
        load_target(path)


def test_missing_tensor(ckpt):
    path, tensors = ckpt
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(96, 64\)\)"):
        load_target(path)


def test_misshaped_tensor(ckpt):
    path, tensors = ckpt
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    _rewrite(path, tensors)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.2.self_attn.k_proj.weight' in .*model.safetensors has shape \(32, 64\), expected \(64, 64\)",
    ):
        load_target(path)


def test_unexpected_tensor(ckpt):
    path, tensors = ckpt
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((128,), np.float32)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_target(path)


def test_truncated_safetensors(ckpt):
    path, _ = ckpt
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' with shape"):
        load_target(path)


def test_not_a_checkpoint_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_target(str(bogus))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a transformers checkpoint directory or a .gguf file"):
        load_target(str(other))


def test_sharded_index_pointing_to_missing_shard(tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(tiny_path("llama_tied_sharded"), path)
    os.remove(os.path.join(path, "model-00003-of-00006.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00003-of-00006.safetensors, which does not exist"):
        load_target(path)


def test_save_file_round_trip(tmp_path):
    import ml_dtypes

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.linspace(-2, 2, 7).astype(ml_dtypes.bfloat16),
        "c": np.array([1, -2, 3], np.int32),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(str(tmp_path / "t.safetensors"))
    read = {k: f.array(k) for k in f.keys()}
    chex.assert_trees_all_equal_dtypes(read, tensors)
    chex.assert_trees_all_equal(read, tensors)
    # The reference implementation, opened directly, reads what we wrote (the fp32 and int32 tensors).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), framework="numpy") as ref:
        for k in ("a", "c"):
            np.testing.assert_array_equal(ref.get_tensor(k), tensors[k])
