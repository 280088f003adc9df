"""The reference recipes (DeepSpec's 12 configs, section 6.1) and this project's SmolLM2 ones.

Each `configs/<algorithm>_<target>.py` file is one call of `reference_recipe` or
`smollm2_recipe`. Reference targets are named by their Hugging Face id; point `target` at a
local copy of the weights (`--set target=/path/to/Qwen3-4B`), and `train_files` at the
regenerated training conversations (`python -m dspark_jax regenerate ...`). The reference
recipes assume 8 accelerators with one sequence each per micro-step (`micro_batch_size=8`); on
fewer, lower it (`--set micro_batch_size=1`): 512 sequences per update stay 512.
"""

from __future__ import annotations

from dspark_jax.models.draft_config import spread_layer_ids
from dspark_jax.training.config import TrainConfig

# Block drafters' LM head and losses 512 slots of each sequence at a time: on an H200 the Qwen3-4B
# step is faster than with whole logits and plans 8 GiB less (docs/benchmarks.md); the same loss
# to rounding. Eagle3 ignores it.
LOSS_CHUNK = 512
# target -> (HF id, tapped layers, mask token, chat template)
REFERENCE_TARGETS = {
    "qwen3_4b": ("Qwen/Qwen3-4B", (1, 9, 17, 25, 33), 151669, "qwen"),
    "qwen3_8b": ("Qwen/Qwen3-8B", (1, 9, 17, 25, 33), 151669, "qwen"),
    "qwen3_14b": ("Qwen/Qwen3-14B", (1, 10, 19, 28, 37), 151669, "qwen"),
    "gemma4_12b": ("google/gemma-4-12B-it", (5, 17, 29, 41, 46), 4, "gemma4"),
}


def reference_recipe(algorithm: str, target: str, **changes) -> TrainConfig:
    """DeepSpec's recipe: AdamW 6e-4, 4% warmup + cosine, 512 sequences per step, 10 epochs,
    4096 tokens, 512 anchors, block 7, 5 draft layers (Eagle3: 1, TTT 7)."""
    hf_id, layers, mask, template = REFERENCE_TARGETS[target]
    return TrainConfig(
        algorithm=algorithm, target=hf_id, target_layer_ids=layers, mask_token_id=mask, chat_template=template,
        train_files=(f"data/train_{target}.jsonl",), max_length=4096, num_anchors=512, block_size=7,
        global_batch_size=512, micro_batch_size=8, num_epochs=10, learning_rate=6e-4, warmup_ratio=0.04,
        seed=0 if algorithm == "eagle3" else 42, log_every=10, save_every=3000, loss_chunk=LOSS_CHUNK,
        output_dir=f"runs/{algorithm}_{'ttt7' if algorithm == 'eagle3' else 'block7'}_{target}", **changes,
    )


def smollm2_recipe(algorithm: str, **changes) -> TrainConfig:
    """The reference recipe scaled to SmolLM2-135M-Instruct (30 layers, H = 576) on one GPU."""
    return TrainConfig(
        algorithm=algorithm, target="smollm2", target_layer_ids=spread_layer_ids(30), chat_template="chatml",
        train_files=("data/train_smollm2.jsonl",), max_length=2048, num_anchors=512, block_size=7,
        global_batch_size=64, micro_batch_size=8, num_epochs=10, learning_rate=6e-4, warmup_ratio=0.04,
        seed=0 if algorithm == "eagle3" else 42, log_every=10, save_every=500, loss_chunk=LOSS_CHUNK,
        output_dir=f"runs/{algorithm}_smollm2", **changes,
    )
