"""scripts/save_random_target.py: a preset's shape with random weights and SmolLM2's tokenizer,
read back by load_target with the same weights, config and chat template."""

import os
import sys

import jax
import numpy as np
import pytest

from dspark_jax import Target, load_target
from dspark_jax.models.presets import preset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import save_random_target  # noqa: E402


@pytest.mark.slow  # about 25 s on 2 cores (135M random weights written and read); a benchmark helper
def test_the_saved_target_loads_back_with_its_weights_and_tokenizer(tmp_path):
    out = str(tmp_path / "smol")
    save_random_target.main(["--preset", "smollm2-135m", "--seed", "3", "--out", out])
    loaded = load_target(out, dtype="bfloat16")
    made = Target.random(preset("smollm2-135m"), seed=3, dtype="bfloat16")
    assert loaded.config.num_layers == made.config.num_layers and loaded.config.vocab_size == 49152
    for a, b in zip(jax.tree.leaves(loaded.params)[:4], jax.tree.leaves(made.params)[:4]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text
