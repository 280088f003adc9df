"""Configuration of draft models (DSpark, DFlash, Eagle3) in the DeepSpec checkpoint format.

A DeepSpec draft `config.json` is a full copy of the target's config with overrides
(`architectures`, `num_hidden_layers`, `target_layer_ids`, `block_size`, `markov_rank`, ...).
`DraftConfig` keeps the parsed fields plus the original JSON, so a loaded config is written
back unchanged. DFlash is the DSpark architecture with `markov_rank=0` and no confidence head.
Draft layers follow the target family: `Qwen3DSparkModel` / `Qwen3Eagle3Model` for Qwen3
targets (as released), `Gemma4DSparkModel` / `Gemma4Eagle3Model` for Gemma4 targets (their
layers are Gemma4 full-attention layers: global head dim, keys as values, sandwich norms),
`LlamaDSparkModel` / `LlamaEagle3Model` for Llama targets.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from dspark_jax.models.config import ConfigError, ModelConfig, from_hf_config, to_hf_config

MARKOV_HEADS = ("vanilla", "gated", "rnn")

# architectures[0] -> (layer family, drafter kind)
_ARCHITECTURES = {
    "Qwen3DSparkModel": ("qwen3", "block"),
    "LlamaDSparkModel": ("llama", "block"),
    "Qwen3Eagle3Model": ("qwen3", "eagle3"),
    "LlamaEagle3Model": ("llama", "eagle3"),
    "Gemma4DSparkModel": ("gemma4", "block"),
    "Gemma4Eagle3Model": ("gemma4", "eagle3"),
}
_FAMILY_NAMES = {"qwen3": "Qwen3", "llama": "Llama", "gemma4": "Gemma4"}


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A draft model: its decoder-layer dimensions and the drafting options.

    algorithm: "dspark" | "dflash" (block drafters: gamma slots in one parallel pass) or
    "eagle3" (one layer run autoregressively). block_size is gamma, the number of draft tokens
    per round (Eagle3's ttt_length).
    """

    algorithm: str
    layers: ModelConfig
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    block_size: int = 7
    mask_token_id: int | None = None
    num_anchors: int = 512
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    confidence_head: bool = False
    confidence_with_markov: bool = False
    step_loss_decay: float = 0.8
    target_model_name_or_path: str | None = None
    # The config.json this came from, written back with the fields above (not compared).
    hf_json: str = dataclasses.field(default="{}", compare=False)

    def __post_init__(self):
        ids = self.target_layer_ids
        if list(ids) != sorted(set(ids)) or not ids:
            raise ConfigError(f"target_layer_ids {list(ids)} must be non-empty and strictly increasing")
        low = 0 if self.algorithm == "eagle3" else -1
        if ids[0] < low or ids[-1] >= self.num_target_layers:
            raise ConfigError(
                f"target_layer_ids {list(ids)} out of range [{low}, {self.num_target_layers}) for {self.algorithm}"
            )
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.algorithm == "eagle3":
            if self.layers.num_layers != 1:
                raise ConfigError(f"Eagle3 has exactly one draft layer, got num_hidden_layers={self.layers.num_layers}")
            return
        if self.algorithm not in ("dspark", "dflash"):
            raise ConfigError(f"unknown draft algorithm {self.algorithm!r}")
        if self.mask_token_id is None or not 0 <= self.mask_token_id < self.layers.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} must be a token id of the vocabulary")
        if self.markov_head_type not in MARKOV_HEADS:
            raise ConfigError(f"markov_head_type {self.markov_head_type!r} is not one of {MARKOV_HEADS}")
        if self.confidence_with_markov and not (self.confidence_head and self.markov_rank > 0):
            raise ConfigError("confidence_head_with_markov needs enable_confidence_head and markov_rank > 0")
        if (self.algorithm == "dflash") != (self.markov_rank == 0 and not self.confidence_head):
            raise ConfigError(
                f"algorithm {self.algorithm!r} does not match markov_rank={self.markov_rank}, "
                f"enable_confidence_head={self.confidence_head} (DFlash has neither)"
            )

    @property
    def feature_size(self) -> int:
        """Width of the concatenated tapped target features, len(target_layer_ids) * H."""
        return len(self.target_layer_ids) * self.layers.hidden_size

    @property
    def architecture(self) -> str:
        family = _FAMILY_NAMES[self.layers.family]
        return f"{family}{'Eagle3' if self.algorithm == 'eagle3' else 'DSpark'}Model"


def check_draft_fits(config: DraftConfig, target: ModelConfig) -> None:
    """A ValueError naming every dimension in which a draft of this config does not fit the target."""
    d = config.layers
    problems = []
    if d.vocab_size != target.vocab_size:
        problems.append(f"vocab_size {d.vocab_size} != target's {target.vocab_size}")
    if d.hidden_size != target.hidden_size:
        problems.append(f"hidden_size {d.hidden_size} != target's {target.hidden_size}")
    if config.num_target_layers != target.num_layers or max(config.target_layer_ids) >= target.num_layers:
        problems.append(
            f"tapped layers {list(config.target_layer_ids)} of a {config.num_target_layers}-layer target, "
            f"but the target has {target.num_layers} layers"
        )
    if problems:
        raise ValueError("draft does not fit this target: " + "; ".join(problems))


def draft_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> DraftConfig:
    """Parses a DeepSpec draft config.json."""
    archs = list(cfg.get("architectures") or [])
    arch = next((a for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(f"{source}: unknown draft architecture {archs}; supported: {sorted(_ARCHITECTURES)}")
    family, kind = _ARCHITECTURES[arch]
    # a Gemma4 draft's config is a copy of its target's text config: every draft layer is full
    model_type = family
    if family == "gemma4":  # keep a unified text type: its defaults (no per-layer inputs) differ
        model_type = "gemma4_unified_text" if "unified" in str(cfg.get("model_type", "")) else "gemma4_text"
    extra = {"layer_types": ["full_attention"] * int(cfg.get("num_hidden_layers", 1))} if family == "gemma4" else {}
    layers = from_hf_config({**cfg, **extra, "architectures": [], "model_type": model_type,
                             "tie_word_embeddings": False}, source)

    def need(key):
        if key not in cfg:
            raise ConfigError(f"{source}: missing required key {key!r}")
        return cfg[key]

    common = dict(
        layers=layers,
        target_layer_ids=tuple(int(i) for i in need("target_layer_ids")),
        num_target_layers=int(need("num_target_layers")),
        target_model_name_or_path=cfg.get("target_model_name_or_path"),
        hf_json=json.dumps(dict(cfg), sort_keys=True),
    )
    if kind == "eagle3":
        return DraftConfig(
            algorithm="eagle3",
            block_size=int(cfg.get("ttt_length", 7)),
            step_loss_decay=float(cfg.get("step_loss_decay", 0.8)),
            **common,
        )
    rank = int(cfg.get("markov_rank", 0))
    confidence = bool(cfg.get("enable_confidence_head", False))
    return DraftConfig(
        algorithm="dspark" if rank > 0 or confidence else "dflash",
        block_size=int(need("block_size")),
        mask_token_id=int(need("mask_token_id")),
        num_anchors=int(cfg.get("num_anchors", 512)),
        markov_rank=rank,
        markov_head_type=str(cfg.get("markov_head_type", "vanilla")),
        confidence_head=confidence,
        confidence_with_markov=bool(cfg.get("confidence_head_with_markov", False)),
        **common,
    )


def draft_to_hf(config: DraftConfig) -> dict[str, Any]:
    """The DeepSpec config.json of a draft: its base config with the draft fields set."""
    out = json.loads(config.hf_json) or to_hf_config(config.layers)
    out.update(
        architectures=[config.architecture],
        num_hidden_layers=config.layers.num_layers,
        layer_types=["full_attention"] * config.layers.num_layers,
        tie_word_embeddings=False,
        target_layer_ids=list(config.target_layer_ids),
        num_target_layers=config.num_target_layers,
    )
    if config.target_model_name_or_path is not None:
        out["target_model_name_or_path"] = config.target_model_name_or_path
    if config.algorithm == "eagle3":
        out.update(ttt_length=config.block_size, step_loss_decay=config.step_loss_decay,
                   draft_num_hidden_layers=config.layers.num_layers)
        return out
    out.update(
        block_size=config.block_size,
        mask_token_id=config.mask_token_id,
        num_anchors=config.num_anchors,
        enable_confidence_head=config.confidence_head,
        markov_rank=config.markov_rank,
    )
    if config.algorithm == "dspark":
        out.update(confidence_head_with_markov=config.confidence_with_markov, markov_head_type=config.markov_head_type)
    return out


def spread_layer_ids(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """`count` tapped layers spread over the target as the reference picks them:
    [1, 9, 17, 25, 33] for 36 layers (Qwen3-4B/8B), [1, 10, 19, 28, 37] for 40 (Qwen3-14B).
    A target too shallow to spread `count` distinct layers this way gets its first ones."""
    if num_layers < count + 3:
        return tuple(range(min(count, num_layers)))
    return tuple(1 + round(i * (num_layers - 4) / (count - 1)) for i in range(count))


def draft_config_for_target(
    target: ModelConfig,
    algorithm: str,
    target_layer_ids: Sequence[int],
    *,
    num_layers: int | None = None,
    block_size: int = 7,
    mask_token_id: int | None = None,
    num_anchors: int = 512,
    markov_rank: int = 256,
    markov_head_type: str = "vanilla",
    confidence_with_markov: bool = True,
    step_loss_decay: float = 0.8,
    target_model_name_or_path: str | None = None,
) -> DraftConfig:
    """A new draft for `target`, with the reference recipe's defaults (5 layers, 1 for Eagle3).

    The draft layers copy every dimension of the target's (as DeepSpec does); DFlash ignores
    the Markov and confidence options.
    """
    num_layers = num_layers or (1 if algorithm == "eagle3" else 5)
    full = ("full_attention",) * num_layers if target.gemma else ()
    layers = dataclasses.replace(target, num_layers=num_layers, tie_word_embeddings=False, layer_types=full,
                                 sliding_window=None)
    base = to_hf_config(layers)
    common = dict(layers=layers, target_layer_ids=tuple(target_layer_ids), num_target_layers=target.num_layers,
                  block_size=block_size, target_model_name_or_path=target_model_name_or_path,
                  hf_json=json.dumps(base, sort_keys=True))
    if algorithm == "eagle3":
        return DraftConfig(algorithm="eagle3", step_loss_decay=step_loss_decay, **common)
    dspark = algorithm == "dspark"
    return DraftConfig(
        algorithm=algorithm,
        mask_token_id=mask_token_id,
        num_anchors=num_anchors,
        markov_rank=markov_rank if dspark else 0,
        markov_head_type=markov_head_type,
        confidence_head=dspark,
        confidence_with_markov=dspark and confidence_with_markov,
        **common,
    )
