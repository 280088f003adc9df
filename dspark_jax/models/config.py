"""Static configuration of a decoder-only target model (Llama and Qwen3 families).

`ModelConfig` is a frozen, hashable dataclass so it can be a static argument of `jax.jit`
and a field of Linen modules. `from_hf_config` reads a transformers `config.json` dict
(v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`) and names the offending key
when something is missing or unsupported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

FAMILIES = ("llama", "qwen3")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")  # see dspark_jax.models.attention

# transformers `architectures[0]` / `model_type` -> our family name.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3Model": "qwen3",
}
_MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3"}
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ConfigError(ValueError):
    """A model configuration is missing a key or asks for something unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    rope_type "default" uses inv_freq_i = theta^(-2i/d); "llama3" applies Llama 3.1's
    piecewise frequency rescaling; "freq_factors" divides each frequency by an explicit factor
    (the form in which GGUF files store Llama 3.1 scaling).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """fp32 inverse frequencies [head_dim // 2]."""
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / np.power(np.float32(self.theta), exponents)).astype(np.float32)
        if self.rope_type == "default":
            return inv_freq
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
class ModelConfig:
    """Dimensions and options of a Llama- or Qwen3-style decoder."""

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

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each query and key head with its own RMSNorm before RoPE."""
        return self.family == "qwen3"

    @property
    def num_params(self) -> int:
        """Parameter count, computed from the dimensions (the real checkpoint's count)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


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


def rope_from_hf(cfg: Mapping[str, Any], source: str = "config") -> RopeConfig:
    """RoPE parameters from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if not params:
        params = dict(scaling)
        if "rope_theta" in cfg:
            params["rope_theta"] = cfg["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "llama3":
        key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
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
    raise ConfigError(f"{source}: unsupported rope_type {rope_type!r} (supported: default, llama3)")


def from_hf_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a transformers config dict."""
    family = family_of(cfg, source)
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported")
    hidden = int(_require(cfg, "hidden_size", source))
    heads = int(_require(cfg, "num_attention_heads", source))
    head_dim = cfg.get("head_dim") or hidden // heads
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
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
        eos_token_ids=eos_ids,
    )


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """A transformers (v5) config dict describing `config` (inverse of `from_hf_config`)."""
    rope: dict[str, Any] = {"rope_type": config.rope.rope_type, "rope_theta": config.rope.theta}
    if config.rope.rope_type == "llama3":
        rope.update(
            factor=config.rope.factor,
            low_freq_factor=config.rope.low_freq_factor,
            high_freq_factor=config.rope.high_freq_factor,
            original_max_position_embeddings=config.rope.original_max_position_embeddings,
        )
    elif config.rope.rope_type != "default":
        raise ConfigError(f"rope_type {config.rope.rope_type!r} has no transformers config form")
    eos = list(config.eos_token_ids)
    return {
        "architectures": [_CAUSAL_LM[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "attention_bias": False,
        "hidden_act": "silu",
    }
