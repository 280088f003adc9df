"""Static configuration of a decoder-only target model (Llama, Qwen3 and Gemma4 families).

`ModelConfig` is a frozen, hashable dataclass so it can be a static argument of `jax.jit`
and a field of Linen modules. `from_hf_config` reads a transformers `config.json` dict
(v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`) and names the offending key
when something is missing or unsupported.

Gemma4 layers come in two kinds (`layer_types`): "sliding_attention" layers attend over the
last `sliding_window` positions with `head_dim`, `num_kv_heads` and `rope`;
"full_attention" layers attend over everything with `global_head_dim`,
`num_global_kv_heads` (when keys double as values, `attention_k_eq_v`) and `global_rope`.
`layer_spec(i)` resolves what layer i uses; Llama and Qwen3 layers are all the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

FAMILIES = ("llama", "qwen3", "gemma4")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")  # see dspark_jax.models.attention

# transformers `architectures[0]` / `model_type` -> our family name.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3Model": "qwen3",
}
_GEMMA4_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
_MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", **{t: "gemma4" for t in _GEMMA4_MODEL_TYPES}}
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma4": "Gemma4ForCausalLM"}
_HF_MODEL_TYPE = {"llama": "llama", "qwen3": "qwen3", "gemma4": "gemma4_text"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


class ConfigError(ValueError):
    """A model configuration is missing a key or asks for something unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    rope_type "default" uses inv_freq_i = theta^(-2i/d); "llama3" applies Llama 3.1's
    piecewise frequency rescaling; "freq_factors" divides each frequency by an explicit factor
    (the form in which GGUF files store Llama 3.1 scaling); "proportional" (Gemma4's global
    layers) keeps the first int(partial_rotary_factor * d / 2) default frequencies and zeroes
    the rest, so those dimension pairs pass unrotated.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None
    partial_rotary_factor: float = 1.0

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """fp32 inverse frequencies [head_dim // 2]."""
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / np.power(np.float32(self.theta), exponents)).astype(np.float32)
        if self.rope_type == "default":
            return inv_freq
        if self.rope_type == "proportional":
            rotated = int(self.partial_rotary_factor * head_dim // 2)
            kept = np.where(np.arange(inv_freq.size) < rotated, inv_freq, 0)
            return (kept / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "freq_factors":
            factors = np.asarray(self.freq_factors, dtype=np.float32)
            if factors.shape != inv_freq.shape:
                raise ConfigError(
                    f"rope freq_factors has {factors.size} entries, expected {inv_freq.size} "
                    f"(head_dim {head_dim} / 2)"
                )
            return (inv_freq / factors).astype(np.float32)
        if self.rope_type == "llama3":
            old_len = np.float32(self.original_max_position_embeddings)
            low_wavelen = old_len / np.float32(self.low_freq_factor)
            high_wavelen = old_len / np.float32(self.high_freq_factor)
            wavelen = np.float32(2 * math.pi) / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(self.factor), inv_freq)
            smooth = (old_len / wavelen - np.float32(self.low_freq_factor)) / np.float32(
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        raise ConfigError(f"unsupported rope_type {self.rope_type!r}")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer's attention uses (see `ModelConfig.layer_spec`)."""

    head_dim: int
    num_kv_heads: int
    rope: RopeConfig
    window: int | None = None  # a sliding-window layer attends to the last `window` positions
    k_eq_v: bool = False  # values are the (unrotated) keys' projection: no v_proj


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and options of a Llama-, Qwen3- or Gemma4-style decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    attention: str = "xla"  # implementation (`dspark_jax.models.attention`): "xla", "cudnn" or "pallas"
    hidden_activation: str = "silu"
    final_logit_softcapping: float | None = None
    # Gemma4 only (see the module docstring); empty layer_types means every layer is full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    global_head_dim: int | None = None
    num_global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    global_rope: RopeConfig | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not one of {ACTIVATIONS}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for kind in self.layer_types:
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types entry {kind!r} is not one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding_attention layers need a positive sliding_window")
        for spec in {self.layer_spec(i) for i in range(self.num_layers)}:
            if self.num_heads % spec.num_kv_heads:
                raise ConfigError(
                    f"num_attention_heads {self.num_heads} is not a multiple of the key/value head count "
                    f"{spec.num_kv_heads}"
                )
            if spec.head_dim % 2:
                raise ConfigError(f"head_dim {spec.head_dim} must be even for rotary embeddings")

    @property
    def gemma(self) -> bool:
        """Gemma4 layers: scaled embeddings, sandwich norms, a value norm and attention scale 1."""
        return self.family == "gemma4"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 and Gemma4 normalise each query and key head with its own RMSNorm before RoPE."""
        return self.family in ("qwen3", "gemma4")

    @property
    def attention_scale(self) -> float | None:
        """Logit scale of every layer: None is 1/sqrt(head_dim); Gemma4's q/k norms carry it."""
        return 1.0 if self.gemma else None

    def layer_spec(self, i: int) -> LayerSpec:
        """The attention dimensions, RoPE and window of decoder layer i."""
        if self.layer_types and self.layer_types[i] == "sliding_attention":
            return LayerSpec(self.head_dim, self.num_kv_heads, self.rope, window=self.sliding_window)
        if not self.gemma:
            return LayerSpec(self.head_dim, self.num_kv_heads, self.rope)
        kv_heads = self.num_global_kv_heads if self.attention_k_eq_v and self.num_global_kv_heads else self.num_kv_heads
        return LayerSpec(self.global_head_dim or self.head_dim, kv_heads, self.global_rope or self.rope,
                         k_eq_v=self.attention_k_eq_v)

    @property
    def kv_width(self) -> int:
        """Key plus value entries one position takes in a full cache, summed over layers."""
        return sum(2 * s.num_kv_heads * s.head_dim for s in map(self.layer_spec, range(self.num_layers)))

    @property
    def num_params(self) -> int:
        """Parameter count, computed from the dimensions (the real checkpoint's count)."""
        h, i = self.hidden_size, self.intermediate_size
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for layer in range(self.num_layers):
            spec = self.layer_spec(layer)
            d, kv = spec.head_dim, spec.num_kv_heads
            attn = h * d * (2 * self.num_heads + (1 if spec.k_eq_v else 2) * kv)
            norms = (4 * h + 1) if self.gemma else 2 * h  # Gemma4: four sandwich norms and layer_scalar
            total += attn + 3 * h * i + norms + (2 * d if self.qk_norm else 0)
        return total


def _require(cfg: Mapping[str, Any], key: str, source: str):
    if key not in cfg:
        raise ConfigError(f"{source}: missing required key {key!r}")
    return cfg[key]


def family_of(cfg: Mapping[str, Any], source: str = "config") -> str:
    """The model family named by a transformers config dict, or a ConfigError naming it."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    supported = sorted(_ARCHITECTURES)
    raise ConfigError(
        f"{source}: unknown architecture (architectures={archs}, model_type={model_type!r}); "
        f"supported: {supported}"
    )


def rope_from_hf(cfg: Mapping[str, Any], source: str = "config", params: Mapping[str, Any] | None = None,
                 key: str | None = None) -> RopeConfig:
    """RoPE parameters from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling` (or the
    given `params` dict, named `key` in errors: Gemma4 keeps one per layer type)."""
    if params is None:
        params = dict(cfg.get("rope_parameters") or {})
        key = "rope_parameters" if params else "rope_scaling"
        if not params:
            params = dict(cfg.get("rope_scaling") or {})
            if "rope_theta" in cfg:
                params["rope_theta"] = cfg["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "proportional":
        return RopeConfig(theta=theta, rope_type="proportional", factor=float(params.get("factor", 1.0)),
                          partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)))
    if rope_type == "llama3":
        return RopeConfig(
            theta=theta,
            rope_type="llama3",
            factor=float(_require(params, "factor", f"{source} {key}")),
            low_freq_factor=float(_require(params, "low_freq_factor", f"{source} {key}")),
            high_freq_factor=float(_require(params, "high_freq_factor", f"{source} {key}")),
            original_max_position_embeddings=int(
                _require(params, "original_max_position_embeddings", f"{source} {key}")
            ),
        )
    raise ConfigError(f"{source}: {key}: unsupported rope_type {rope_type!r} "
                      "(supported: default, llama3, proportional)")


def _eos_ids(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))


def from_hf_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a transformers config dict."""
    family = family_of(cfg, source)
    if family == "gemma4":
        return _gemma4_from_hf(cfg, source)
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported")
    hidden = int(_require(cfg, "hidden_size", source))
    heads = int(_require(cfg, "num_attention_heads", source))
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelConfig(
        family=family,
        vocab_size=int(_require(cfg, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", source)),
        num_layers=int(_require(cfg, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(cfg, source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        hidden_activation=str(cfg.get("hidden_act", "silu")),
    )


def _gemma4_from_hf(cfg: Mapping[str, Any], source: str) -> ModelConfig:
    """A Gemma4 text decoder from a `gemma4[_unified]` config (its `text_config`) or a
    `gemma4[_unified]_text` one, with transformers' defaults for absent keys. Features this
    decoder does not implement are refused by name."""
    outer = cfg
    if cfg.get("model_type") in ("gemma4", "gemma4_unified") or "text_config" in cfg:
        cfg = _require(cfg, "text_config", source)
        source = f"{source} text_config"
    unified = "unified" in str(cfg.get("model_type", outer.get("model_type", "")))
    refused = {
        "hidden_size_per_layer_input": (0 if unified else 256, "per-layer input embeddings"),
        "enable_moe_block": (False, "mixture-of-experts blocks"),
        "num_kv_shared_layers": (0, "key/value sharing across layers"),
        "attention_bias": (False, "attention biases"),
    }
    for key, (default, what) in refused.items():
        if cfg.get(key, default):
            raise ConfigError(f"{source}: {key}={cfg.get(key, default)!r} ({what}) is not supported")
    if cfg.get("use_bidirectional_attention", "vision" if unified else None) == "all":
        raise ConfigError(f"{source}: use_bidirectional_attention='all' is not supported (text decoding is causal)")
    layers = int(_require(cfg, "num_hidden_layers", source))
    layer_types = list(cfg.get("layer_types") or
                       ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
    layer_types[-1] = "full_attention"  # as transformers forces
    ropes = cfg.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    }
    for kind in set(layer_types):
        if kind not in ropes:
            raise ConfigError(f"{source}: rope_parameters has no entry for {kind!r} layers")
    sliding = "sliding_attention" in layer_types
    softcap = cfg.get("final_logit_softcapping")
    global_head_dim, global_kv_heads = cfg.get("global_head_dim", 512), cfg.get("num_global_key_value_heads")
    if "per_layer_config" in cfg and "global_head_dim" not in cfg:  # how transformers writes the two keys above
        global_head_dim, global_kv_heads = _gemma4_overrides(cfg["per_layer_config"] or {}, layer_types, cfg, source)
    return ModelConfig(
        family="gemma4",
        vocab_size=int(_require(cfg, "vocab_size", source)),
        hidden_size=int(_require(cfg, "hidden_size", source)),
        intermediate_size=int(_require(cfg, "intermediate_size", source)),
        num_layers=layers,
        num_heads=int(_require(cfg, "num_attention_heads", source)),
        num_kv_heads=int(_require(cfg, "num_key_value_heads", source)),
        head_dim=int(cfg.get("head_dim", 256)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(cfg, source, ropes.get("sliding_attention") or {}, "rope_parameters.sliding_attention"),
        tie_word_embeddings=bool(outer.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        bos_token_id=cfg.get("bos_token_id", 2),
        eos_token_ids=_eos_ids(outer if "eos_token_id" in outer else {"eos_token_id": 1, **cfg}),
        hidden_activation=str(cfg.get("hidden_activation", "gelu_pytorch_tanh")),
        final_logit_softcapping=None if softcap is None else float(softcap),
        layer_types=tuple(layer_types),
        sliding_window=int(cfg.get("sliding_window", 1024 if unified else 512)) if sliding else None,
        global_head_dim=int(global_head_dim),
        num_global_kv_heads=None if global_kv_heads is None else int(global_kv_heads),
        attention_k_eq_v=bool(cfg.get("attention_k_eq_v", False)),
        global_rope=rope_from_hf(cfg, source, ropes["full_attention"], "rope_parameters.full_attention")
        if "full_attention" in ropes else None,
    )


def _gemma4_overrides(overrides: Mapping[str, Any], layer_types: list[str], cfg: Mapping[str, Any], source: str):
    """(global head dim, global key/value heads) from transformers' `per_layer_config`, which
    must give every full_attention layer, and only those, the same overrides."""
    full = {json.dumps(v, sort_keys=True) for v in overrides.values()}
    if len(full) > 1 or any(not 0 <= int(i) < len(layer_types) or layer_types[int(i)] != "full_attention"
                            for i in overrides) or (
            overrides and len(overrides) != layer_types.count("full_attention")):
        raise ConfigError(f"{source}: per_layer_config {dict(overrides)} must give every full_attention layer, and "
                          "only those, the same overrides")
    first = json.loads(full.pop()) if full else {}
    unknown = set(first) - {"head_dim", "num_key_value_heads"}
    if unknown:
        raise ConfigError(f"{source}: per_layer_config overrides {sorted(unknown)} are not supported")
    return first.get("head_dim", cfg.get("head_dim", 256)), first.get("num_key_value_heads")


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type == "llama3":
        out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.rope_type == "proportional":
        out.update(partial_rotary_factor=rope.partial_rotary_factor, factor=rope.factor)
    elif rope.rope_type != "default":
        raise ConfigError(f"rope_type {rope.rope_type!r} has no transformers config form")
    return out


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """A transformers (v5) config dict describing `config` (inverse of `from_hf_config`)."""
    eos = list(config.eos_token_ids)
    out = {
        "architectures": [_CAUSAL_LM[config.family]],
        "model_type": _HF_MODEL_TYPE[config.family],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": _rope_to_hf(config.rope),
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "attention_bias": False,
        "hidden_act": config.hidden_activation,
    }
    if not config.gemma:
        return out
    layer_types = list(config.layer_types or ["full_attention"] * config.num_layers)
    ropes = {"full_attention": _rope_to_hf(config.global_rope or config.rope)}
    if "sliding_attention" in layer_types:
        ropes["sliding_attention"] = _rope_to_hf(config.rope)
    del out["hidden_act"]
    out.update(
        hidden_activation=config.hidden_activation, final_logit_softcapping=config.final_logit_softcapping,
        layer_types=layer_types, sliding_window=config.sliding_window or 512, rope_parameters=ropes,
        global_head_dim=config.global_head_dim or config.head_dim,
        num_global_key_value_heads=config.num_global_kv_heads,
        attention_k_eq_v=config.attention_k_eq_v, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        enable_moe_block=False, use_double_wide_mlp=False, attention_dropout=0.0,
    )
    return out
