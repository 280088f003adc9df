"""Training recipes: one frozen dataclass, written as a Python file per recipe.

A recipe file (`configs/<name>.py`) defines `config = TrainConfig(...)`; `load_config` runs it
and applies `--set key=value` overrides, each value parsed as the field's type. Unknown keys
and unparsable values raise a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import runpy
import typing

from dspark_jax.models.config import ConfigError


# Head dims at which the block attention kernels ran compiled on a GPU against their reference
# (tests/pallas_kernels/test_block_attention.py -m gpu; scripts/bench_block_attention.py).
GPU_ATTENTION_HEAD_DIMS = frozenset({64, 128})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Drafter (the reference recipe's defaults).
    algorithm: str = "dspark"  # dspark | dflash | eagle3
    target: str = "demo"  # checkpoint dir or .gguf | "smollm2" (the cached GGUF) | "preset:<name>" (random) | "demo"
    target_layer_ids: tuple[int, ...] = (1, 9, 17, 25, 33)
    num_draft_layers: int = 0  # 0 = 5 for block drafters, 1 for Eagle3
    block_size: int = 7
    mask_token_id: int = -1  # -1 = the last vocabulary row
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    confidence_with_markov: bool = True
    # Data.
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()  # held-out conversations: their losses and acceptance metrics (no update) go to
    # <output_dir>/heldout.jsonl before a fresh run's first update, every eval_every updates (0: at each checkpoint)
    # and after the last; online mode only
    eval_every: int = 0
    chat_template: str = "auto"  # auto | qwen | chatml | llama3 | gemma | gemma4
    max_length: int = 4096
    min_loss_tokens: int = 14
    data_seed: int = 42
    target_mode: str = "online"  # online (target runs in the train step) | offline (read cache_dir)
    cache_dir: str = ""
    # Without train_files: sequences the target samples itself from random prompts (the demo).
    demo_sequences: int = 256
    demo_prompt_length: int = 8
    # Losses. The three alphas weight DSpark's terms; DFlash trains on cross-entropy alone and
    # Eagle3 on its TTT loss, as in the reference.
    num_anchors: int = 512
    loss_decay_gamma: float = 4.0
    ce_alpha: float = 0.1
    tv_alpha: float = 0.9
    confidence_alpha: float = 1.0
    step_loss_decay: float = 0.8
    loss_chunk: int = 0  # DSpark/DFlash: 0 builds whole [slots, V] logits; N computes the head and losses
    # N slots of each sequence at a time, gradients included (dspark_jax.training.fused_loss: [sequences, N, V]
    # arrays instead of [sequences, slots, V])
    loss_kernel: str = "auto"  # with loss_chunk: "pallas" computes each chunk's softmaxes, losses and gradient on
    # the Pallas kernel of pallas_kernels/vocab_loss (GPU; interpreted on CPU), "xla" in jnp; "auto": see `kernel`
    # Optimisation.
    learning_rate: float = 6e-4
    warmup_ratio: float = 0.04
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    global_batch_size: int = 512  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per accumulation micro-step, across all devices
    num_epochs: int = 10
    max_steps: int = 0  # 0 = num_epochs over the data
    seed: int = 42
    dtype: str = "bfloat16"  # compute dtype; master weights and Adam state are fp32
    target_dtype: str = "bfloat16"
    attention: str = "auto"  # "xla"; "cudnn" (GPU: the target's forward on cuDNN); "pallas" (that, and the draft's
    # block attention on the Pallas kernels, forward and backward: see dspark_jax.models.attention); "auto": `kernel`
    # Mesh (data x fsdp x tensor must equal the device count).
    mesh_data: int = -1  # -1 = all devices not used by fsdp and tensor
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # Output.
    output_dir: str = "runs/demo"
    export_frozen: bool = True  # false: the exported draft leaves out the embedding and LM head, which
    # load_draft then takes from the target (dspark_jax.checkpoints.deepspec)
    log_every: int = 10
    save_every: int = 3000
    keep_checkpoints: int = 3

    def __post_init__(self):
        choices = {
            "algorithm": ("dspark", "dflash", "eagle3"),
            "target_mode": ("online", "offline"),
            "chat_template": ("auto", "qwen", "chatml", "llama3", "gemma", "gemma4"),
            "markov_head_type": ("vanilla", "gated", "rnn"),
            "attention": ("auto", "xla", "cudnn", "pallas"),
            "loss_kernel": ("auto", "xla", "pallas"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"config key {key!r}: {getattr(self, key)!r} is not one of {allowed}")
        for key in ("global_batch_size", "micro_batch_size", "max_length", "block_size", "num_anchors", "log_every",
                    "save_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"config key 'global_batch_size' ({self.global_batch_size}) must be a multiple of "
                              f"'micro_batch_size' ({self.micro_batch_size})")
        if self.loss_chunk < 0:
            raise ConfigError(f"config key 'loss_chunk' must be >= 0, got {self.loss_chunk}")
        if self.eval_every < 0:
            raise ConfigError(f"config key 'eval_every' must be >= 0, got {self.eval_every}")
        if self.eval_files and self.target_mode == "offline":
            raise ConfigError("config key 'eval_files' needs target_mode 'online' (the target computes the held-out "
                              "features in the step)")
        if self.target_mode == "offline" and not self.cache_dir:
            raise ConfigError("config key 'cache_dir' must be set when target_mode is 'offline'")

    def kernel(self, key: str, head_dims: typing.Iterable[int] = ()) -> str:
        """The recipe's `attention` or `loss_kernel` on the backend this process runs: "auto" is
        "pallas" on a GPU, where the kernels train faster (docs/benchmarks.md), and "xla"
        elsewhere (on a CPU the kernels only run interpreted, and the TPU kernels have not run on
        a TPU yet). For attention, `head_dims` are the model's: "auto" keeps "xla" unless each
        is one the GPU kernels have been compiled and checked at (GPU_ATTENTION_HEAD_DIMS)."""
        value = getattr(self, key)
        if value != "auto":
            return value
        import jax

        on_gpu = jax.default_backend() == "gpu"
        return "pallas" if on_gpu and set(head_dims) <= GPU_ATTENTION_HEAD_DIMS else "xla"

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def total_steps(self, num_sequences: int) -> int:
        """Optimizer steps: max_steps, else num_epochs passes over the data."""
        if self.max_steps:
            return self.max_steps
        return max(1, self.num_epochs * math.floor(num_sequences / self.global_batch_size))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def _parse(key: str, kind, text: str):
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if origin is tuple:
            item = typing.get_args(kind)[0]
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            return tuple(item(p.strip()) for p in parts)
        return kind(text)
    except ValueError as e:
        raise ConfigError(f"--set {key}={text}: {e}") from None


def override(config: TrainConfig, assignments: typing.Sequence[str]) -> TrainConfig:
    """config with `key=value` assignments applied (values parsed as the field's type)."""
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        if key not in hints:
            raise ConfigError(f"--set {key}: unknown config key; known keys: {', '.join(sorted(hints))}")
        changes[key] = _parse(key, hints[key], text)
    return dataclasses.replace(config, **changes)


def load_config(path: str, assignments: typing.Sequence[str] = ()) -> TrainConfig:
    """The `config` a recipe file defines, with overrides applied."""
    namespace = runpy.run_path(path)
    config = namespace.get("config")
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path}: a recipe must define `config = TrainConfig(...)`")
    return override(config, assignments)
