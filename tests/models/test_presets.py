"""Full-size configs build under jax.eval_shape with the real models' parameter counts."""

import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from dspark_jax import Target
from dspark_jax.models.presets import preset
from dspark_jax.models.target import abstract_params
from tests.helpers import FIXTURES

# Parameter counts of the published checkpoints.
REAL_COUNTS = {
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "llama-3.1-8b": 8_030_261_248,
    "smollm2-135m": 134_515_008,
    # transformers' Gemma4UnifiedForCausalLM of that config, counted on the meta device
    "gemma4-12b": json.load(open(os.path.join(FIXTURES, "gemma4_12b.json")))["num_params"],
}


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_param_count(name):
    config = preset(name)
    shapes, _ = abstract_params(config)
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == REAL_COUNTS[name]
    assert config.num_params == REAL_COUNTS[name]


def test_full_size_forward_shapes_without_memory():
    config = preset("qwen3-8b")
    shapes, _ = abstract_params(config)
    target = Target(config, shapes)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits, hidden, taps = jax.eval_shape(
        lambda p, i: target.forward(p, i, hidden_layers=(1, 9, 17, 25, 33)), shapes, ids
    )
    assert logits.shape == (2, 16, 151936) and logits.dtype == jnp.float32
    assert hidden.shape == (2, 16, 4096) and taps.shape == (2, 16, 5, 4096)


def test_gemma4_12b_preset_is_the_fixture_config_and_runs_under_eval_shape():
    fixture = json.load(open(os.path.join(FIXTURES, "gemma4_12b.json")))["text_config"]
    config = preset("gemma4-12b")
    assert config.num_params == 11_907_350_320
    specs = [config.layer_spec(i) for i in range(48)]
    assert [s.window for s in specs] == [None if kind == "full_attention" else 1024 for kind in fixture["layer_types"]]
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in specs} == {(256, 8, False), (512, 1, True)}
    shapes, _ = abstract_params(config)
    target = Target(config, shapes)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    logits, _, taps = jax.eval_shape(lambda p, i: target.forward(p, i, hidden_layers=(5, 17, 29, 41, 46)), shapes, ids)
    assert logits.shape == (1, 8, 262144) and taps.shape == (1, 8, 5, 3840)
