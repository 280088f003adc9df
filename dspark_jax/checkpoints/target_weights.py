"""Checkpoint names of the target decoder's parameters (transformers and GGUF files).

Each table maps a parameter path (with "layers" standing for every `layers_<i>`) to the
checkpoint tensor name ("{i}" is the layer number) and, for Linear weights, how many of our
leading dims are its input (see `dspark_jax.checkpoints.binding`).
"""

from __future__ import annotations

from typing import Any

from dspark_jax.checkpoints.binding import Binding, NameTable, bindings_for
from dspark_jax.checkpoints.store import Store

# Decoder-layer parameters shared by every format, as (suffix of the name, n_in).
LAYER_TENSORS: dict[tuple[str, ...], tuple[str, int | None]] = {
    ("input_layernorm", "scale"): ("input_layernorm.weight", None),
    ("post_attention_layernorm", "scale"): ("post_attention_layernorm.weight", None),
    ("pre_feedforward_layernorm", "scale"): ("pre_feedforward_layernorm.weight", None),
    ("post_feedforward_layernorm", "scale"): ("post_feedforward_layernorm.weight", None),
    ("layer_scalar",): ("layer_scalar", None),
    ("self_attn", "q_proj"): ("self_attn.q_proj.weight", 1),
    ("self_attn", "k_proj"): ("self_attn.k_proj.weight", 1),
    ("self_attn", "v_proj"): ("self_attn.v_proj.weight", 1),
    ("self_attn", "o_proj"): ("self_attn.o_proj.weight", 2),
    ("self_attn", "q_norm", "scale"): ("self_attn.q_norm.weight", None),
    ("self_attn", "k_norm", "scale"): ("self_attn.k_norm.weight", None),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", 1),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", 1),
}


def layer_table(prefix: str) -> NameTable:
    """LAYER_TENSORS under `<prefix>layers.{i}.`."""
    return {("layers",) + path: (f"{prefix}layers.{{i}}.{suffix}", n_in) for path, (suffix, n_in) in LAYER_TENSORS.items()}


def hf_table(prefix: str) -> NameTable:
    return {
        ("embed_tokens",): (prefix + "embed_tokens.weight", None),
        ("lm_head",): ("lm_head.weight", 1),
        ("norm", "scale"): (prefix + "norm.weight", None),
        **layer_table(prefix),
    }


_GGUF_LAYER_NAMES = {
    ("input_layernorm", "scale"): "attn_norm",
    ("post_attention_layernorm", "scale"): "ffn_norm",  # Llama/Qwen3: the norm before the MLP
    ("self_attn", "q_proj"): "attn_q",
    ("self_attn", "k_proj"): "attn_k",
    ("self_attn", "v_proj"): "attn_v",
    ("self_attn", "o_proj"): "attn_output",
    ("self_attn", "q_norm", "scale"): "attn_q_norm",
    ("self_attn", "k_norm", "scale"): "attn_k_norm",
    ("mlp", "gate_proj"): "ffn_gate",
    ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
}
# Gemma4's sandwich norms and layer scalar, as llama.cpp's tensor map names them
_GGUF_GEMMA4_NAMES = {
    **_GGUF_LAYER_NAMES,
    ("post_attention_layernorm", "scale"): "post_attention_norm",
    ("pre_feedforward_layernorm", "scale"): "ffn_norm",
    ("post_feedforward_layernorm", "scale"): "post_ffw_norm",
    ("layer_scalar",): "layer_output_scale",
}


def _gguf_table(layer_names: dict) -> NameTable:
    return {
        ("embed_tokens",): ("token_embd.weight", None),
        ("lm_head",): ("output.weight", 1),
        ("norm", "scale"): ("output_norm.weight", None),
        **{("layers",) + path: (f"blk.{{i}}.{layer_names[path]}.weight", n_in)
           for path, (_, n_in) in LAYER_TENSORS.items() if path in layer_names},
    }


def hf_prefix(store: Store) -> str:
    """Where the decoder's tensors live: "model." (a ForCausalLM checkpoint),
    "model.language_model." (Gemma4's multimodal checkpoints) or "" (a bare decoder)."""
    for prefix in ("model.language_model.", "model."):
        if any(name.startswith(prefix) for name in store):
            return prefix
    return ""


def hf_bindings(abstract_params: Any, store: Store) -> list[Binding]:
    return bindings_for(abstract_params, hf_table(hf_prefix(store)))


def gguf_bindings(abstract_params: Any, family: str) -> list[Binding]:
    return bindings_for(abstract_params, _gguf_table(_GGUF_GEMMA4_NAMES if family == "gemma4" else _GGUF_LAYER_NAMES))
