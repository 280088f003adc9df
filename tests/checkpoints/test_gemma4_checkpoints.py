"""Gemma4 checkpoints: the multimodal layout, the two ways configs give the global layers'
dimensions, features this decoder does not implement refused by name, and saving."""

import json
import os

import jax
import numpy as np
import pytest

from dspark_jax import load_target
from dspark_jax.checkpoints.target import save_target
from dspark_jax.checkpoints.safetensors_io import SafetensorsFile, save_file
from dspark_jax.models.config import ConfigError, from_hf_config
from tests.helpers import golden, max_rel_err, tiny_path

NAME = "gemma4_sliding_k_eq_v"


def _text_config():
    with open(os.path.join(tiny_path(NAME), "config.json")) as f:
        return json.load(f)


def test_multimodal_checkpoint_reads_only_the_language_model(tmp_path):
    """Gemma-4-12B-it's layout: a gemma4_unified config whose text_config is the decoder, and
    tensors under model.language_model. beside vision and audio towers, which stay unread."""
    f = SafetensorsFile(os.path.join(tiny_path(NAME), "model.safetensors"))
    tensors = {k.replace("model.", "model.language_model.", 1): np.array(f.array(k)) for k in f.keys()}
    tensors["model.vision_tower.patch_embedder.weight"] = np.ones((4, 4), np.float32)
    tensors["model.embed_audio.embedding_projection.weight"] = np.ones((2, 4), np.float32)
    os.makedirs(tmp_path / "mm")
    save_file(tensors, str(tmp_path / "mm" / "model.safetensors"))
    text = {**_text_config(), "model_type": "gemma4_unified_text", "use_bidirectional_attention": "vision"}
    text.pop("architectures")
    with open(tmp_path / "mm" / "config.json", "w") as out:
        json.dump({"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
                   "tie_word_embeddings": True, "text_config": text, "vision_config": {}}, out)
    target = load_target(str(tmp_path / "mm"), dtype="float32")
    assert target.config == load_target(tiny_path(NAME), dtype="float32").config
    g = golden(NAME)
    logits, _, _ = target.forward(target.params, g["input_ids"])
    assert max_rel_err(logits, g["logits_fp32"]) <= 1e-5


def test_global_dims_from_explicit_keys_or_per_layer_config():
    cfg = _text_config()
    from_overrides = from_hf_config(cfg)  # transformers writes per_layer_config
    explicit = {k: v for k, v in cfg.items() if k != "per_layer_config"}
    explicit.update(global_head_dim=32, num_global_key_value_heads=1)  # as released configs do
    assert from_hf_config(explicit) == from_overrides
    assert [from_overrides.layer_spec(i).head_dim for i in range(4)] == [16, 32, 16, 32]
    assert [from_overrides.layer_spec(i).num_kv_heads for i in range(4)] == [2, 1, 2, 1]
    defaults = {k: v for k, v in explicit.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    assert from_hf_config(defaults).global_head_dim == 512  # transformers' default


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size_per_layer_input", 256, "hidden_size_per_layer_input=256 .per-layer input embeddings."),
    ("enable_moe_block", True, "enable_moe_block=True .mixture-of-experts"),
    ("num_kv_shared_layers", 2, "num_kv_shared_layers=2"),
    ("use_bidirectional_attention", "all", "use_bidirectional_attention='all'"),
    ("attention_bias", True, "attention_bias=True"),
    ("per_layer_config", {"0": {"head_dim": 32}}, "per_layer_config"),
    ("rope_parameters", {"full_attention": {"rope_type": "default"}}, "no entry for 'sliding_attention'"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn"}, "sliding_attention": {}},
     "rope_parameters.full_attention: unsupported rope_type 'yarn'"),
])
def test_unsupported_features_are_refused_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config({**_text_config(), key: value})


def test_gemma4_text_defaults_to_per_layer_inputs():
    """A gemma4_text config that does not say otherwise has transformers' default of 256
    per-layer input dims, which this decoder does not implement."""
    cfg = {k: v for k, v in _text_config().items() if k != "hidden_size_per_layer_input"}
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input=256"):
        from_hf_config(cfg)


def test_save_and_load_back(tmp_path):
    target = load_target(tiny_path(NAME), dtype="float32")
    save_target(target, str(tmp_path / "saved"))
    again = load_target(str(tmp_path / "saved"), dtype="float32")
    assert again.config == target.config
    jax.tree.map(np.testing.assert_array_equal, again.params, target.params)
    saved = json.load(open(tmp_path / "saved" / "config.json"))
    assert (saved["architectures"], saved["global_head_dim"], saved["attention_k_eq_v"]) == (
        ["Gemma4ForCausalLM"], 32, True)


@pytest.mark.parametrize("name", ["gemma4_sliding_k_eq_v", "gemma4_untied_v_proj"])
def test_gguf_as_llama_cpp_writes_gemma4(name):
    """The tiny checkpoints written as llama.cpp's converter writes Gemma4 (sliding-window
    pattern, per-layer key/value heads, full layers without attn_v, the rope_freqs tensor of
    proportional RoPE) load to the same model: transformers' logits within 1e-5."""
    target = load_target(tiny_path(name) + ".gguf", dtype="float32")
    reference = load_target(tiny_path(name), dtype="float32").config
    same = ("layer_types", "sliding_window", "global_head_dim", "attention_k_eq_v", "final_logit_softcapping",
            "tie_word_embeddings", "num_kv_heads", "head_dim", "hidden_activation")
    assert {k: getattr(target.config, k) for k in same} == {k: getattr(reference, k) for k in same}
    assert [target.config.layer_spec(i) for i in range(reference.num_layers)] == [
        reference.layer_spec(i) for i in range(reference.num_layers)]
    assert target.tokenizer is None  # the fixture carries no vocabulary
    g = golden(name)
    logits, _, _ = target.forward(target.params, g["input_ids"])
    assert max_rel_err(logits, g["logits_fp32"]) <= 1e-5
