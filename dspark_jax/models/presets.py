"""Configs of the real target models, as in their transformers config.json files.

Used where the real weights are not needed: parameter counting, `jax.eval_shape` checks of
full-size models, and random-weight benchmarks and recipes of the right shapes.
"""

from __future__ import annotations

from dspark_jax.models.config import ModelConfig, from_hf_config

_QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
    num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
    bos_token_id=151643, eos_token_id=151645, attention_bias=False,
)

HF_CONFIGS: dict[str, dict] = {
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, tie_word_embeddings=False),
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
    # google/gemma-4-12B-it's text decoder (its config.json's text_config)
    "gemma4-12b": dict(
        model_type="gemma4_unified_text", hidden_size=3840, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=1, intermediate_size=15360, vocab_size=262144,
        head_dim=256, global_head_dim=512, attention_k_eq_v=True, tie_word_embeddings=True, sliding_window=1024,
        max_position_embeddings=131072, final_logit_softcapping=30.0,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)],
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
}


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named real model (see HF_CONFIGS)."""
    if name not in HF_CONFIGS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(HF_CONFIGS)}")
    return from_hf_config(HF_CONFIGS[name], source=f"preset {name}")
