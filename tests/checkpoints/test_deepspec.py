"""DeepSpec draft checkpoints: round trips, strict tensor checks, released-recipe parameter counts."""

import functools
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import Draft, load_draft, load_target, save_draft
from dspark_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, save_file
from dspark_jax.models.config import ConfigError
from dspark_jax.models.draft import abstract_module_params
from dspark_jax.models.draft_config import draft_config_for_target, draft_to_hf, spread_layer_ids
from dspark_jax.models.presets import preset
from tests.helpers import tiny_path

TARGET = "qwen3_gqa_untied"  # 3 layers, untied head


@pytest.fixture(scope="module")
def target():
    return load_target(tiny_path(TARGET), dtype="bfloat16")


@pytest.fixture(scope="module")
def make_draft(target):
    """Random drafts for the tiny target, built once per (algorithm, Markov head)."""

    @functools.lru_cache(maxsize=None)
    def make(algorithm, head="vanilla"):
        ids = (0, 1, 2) if algorithm == "eagle3" else (-1, 1)
        config = draft_config_for_target(target.config, algorithm, ids, block_size=5, mask_token_id=159,
                                         markov_rank=16, markov_head_type=head,
                                         target_model_name_or_path="tests/fixtures/tiny/" + TARGET)
        return Draft.random(config, target=target, seed=4)

    return make


@pytest.mark.parametrize("algorithm,head", [("dspark", "vanilla"), ("dspark", "gated"), ("dspark", "rnn"),
                                            ("dflash", "vanilla"), ("eagle3", "vanilla")])
def test_round_trip_is_bit_exact(tmp_path, target, make_draft, algorithm, head):
    draft = make_draft(algorithm, head)
    save_draft(draft, str(tmp_path))
    for reloaded in (load_draft(str(tmp_path)), load_draft(str(tmp_path), target=target)):
        assert reloaded.config == draft.config
        assert draft_to_hf(reloaded.config) == draft_to_hf(draft.config)
        chex.assert_trees_all_equal_dtypes(reloaded.params, draft.params)  # same structure and dtypes
        chex.assert_trees_all_equal(reloaded.params, draft.params)
    # With a target, the frozen arrays are the target's own (no second copy).
    shared = load_draft(str(tmp_path), target=target)
    assert shared.params["embed_tokens"] is target.params["embed_tokens"]
    assert shared.params["lm_head"] is target.params["lm_head"]


def test_saved_names_and_config_follow_deepspec(tmp_path, target, make_draft):
    draft = make_draft("dspark")
    save_draft(draft, str(tmp_path))
    f = SafetensorsFile(os.path.join(tmp_path, "model.safetensors"))
    h, r = 64, 16
    assert f.shape("fc.weight") == (h, 2 * h)
    assert f.shape("layers.1.self_attn.q_proj.weight") == (4 * 32, h)
    assert f.shape("markov_head.markov_w2.weight") == (160, r)
    assert f.shape("confidence_head.proj.weight") == (1, h + r)
    assert f.shape("lm_head.weight") == (160, h)
    np.testing.assert_array_equal(  # our lm_head [H, V] is stored as a Linear weight [V, H]
        np.asarray(f.array("lm_head.weight")), np.asarray(target.params["lm_head"]).T)
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["num_hidden_layers"] == 5
    assert (cfg["markov_rank"], cfg["markov_head_type"], cfg["enable_confidence_head"]) == (16, "vanilla", True)
    assert cfg["target_layer_ids"] == [-1, 1] and cfg["num_target_layers"] == 3 and cfg["block_size"] == 5
    assert cfg["tie_word_embeddings"] is False and cfg["confidence_head_with_markov"] is True
    assert cfg["target_model_name_or_path"] == "tests/fixtures/tiny/" + TARGET


@pytest.fixture
def saved(tmp_path, make_draft):
    save_draft(make_draft("dspark"), str(tmp_path))
    f = SafetensorsFile(os.path.join(tmp_path, "model.safetensors"))
    return str(tmp_path), {k: np.array(f.array(k)) for k in f.keys()}


def _rewrite(path, tensors):
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_missing_tensor(saved):
    path, tensors = saved
    del tensors["layers.3.mlp.down_proj.weight"]
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers.3.mlp.down_proj.weight' \(expected shape \(64, 96\)\)"):
        load_draft(path)


def test_extra_tensor(saved):
    path, tensors = saved
    tensors["markov_head.gate_proj.weight"] = np.zeros((16, 80), np.float32)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'markov_head.gate_proj.weight'"):
        load_draft(path)


def test_misshaped_tensor(saved):
    path, tensors = saved
    tensors["confidence_head.proj.weight"] = np.zeros((1, 64), np.float32)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"'confidence_head.proj.weight' in .* has shape \(1, 64\), expected \(1, 80\)"):
        load_draft(path)


def test_bad_config(saved):
    path, _ = saved
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["Gemma4DSparkModel"]  # a Qwen3 config read as Gemma4 text: transformers' defaults
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match=r"hidden_size_per_layer_input=256 \(per-layer input embeddings\) is not"):
        load_draft(path)
    cfg["architectures"] = ["Qwen3DSparkModel"]
    del cfg["mask_token_id"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="missing required key 'mask_token_id'"):
        load_draft(path)


def test_draft_for_another_target(saved):
    path, _ = saved
    other = load_target(tiny_path("qwen3_mha_tied"), dtype="bfloat16")
    with pytest.raises(CheckpointError, match=r"draft does not fit this target: vocab_size 160 != target's 128"):
        load_draft(path, target=other)


# Released Qwen3-4B recipes (reference section 8.2/8.4): target layers [1, 9, 17, 25, 33], block 7.
RECIPE_COUNTS = {  # (total with the frozen embedding and LM head, trainable)
    "dspark": (1_393_133_569, 615_221_249),
    "dflash": (1_315_339_520, 537_427_200),
    "eagle3": (927_344_896, 149_432_576),
}


@pytest.mark.parametrize("algorithm", sorted(RECIPE_COUNTS))
def test_qwen3_4b_recipe_parameter_counts(algorithm):
    config = draft_config_for_target(preset("qwen3-4b"), algorithm, (1, 9, 17, 25, 33), mask_token_id=151669)
    shapes, _ = abstract_module_params(config)
    trainable = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    frozen = 2 * config.layers.vocab_size * config.layers.hidden_size  # embed_tokens + lm_head
    assert (trainable + frozen, trainable) == RECIPE_COUNTS[algorithm]
    assert shapes["fc"].shape == (12800, 2560) and shapes["fc"].dtype == jnp.bfloat16


def test_spread_layer_ids_as_the_reference_picks_them():
    assert spread_layer_ids(36) == (1, 9, 17, 25, 33) and spread_layer_ids(40) == (1, 10, 19, 28, 37)
    assert spread_layer_ids(30) == (1, 7, 14, 21, 27)  # SmolLM2-135M
    assert spread_layer_ids(8) == (1, 2, 3, 4, 5) and spread_layer_ids(7) == (0, 1, 2, 3, 4)
    assert spread_layer_ids(3) == (0, 1, 2)  # too shallow for five: every layer
