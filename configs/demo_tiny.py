"""CPU demo: a DSpark drafter for the tiny demo target, on sequences the target samples itself.

    python train.py --config configs/demo_tiny.py      # about a minute on 2 CPU cores
"""

from dspark_jax.training.config import TrainConfig

config = TrainConfig(
    algorithm="dspark",
    target="demo",
    target_layer_ids=(0, 1, 2),
    num_draft_layers=1,
    block_size=4,
    markov_rank=32,
    max_length=64,
    min_loss_tokens=1,
    demo_sequences=512,
    num_anchors=16,
    global_batch_size=16,
    micro_batch_size=8,
    max_steps=300,
    learning_rate=3e-3,
    dtype="float32",
    target_dtype="float32",
    output_dir="runs/demo_tiny",
    log_every=10,
    save_every=100,
)
