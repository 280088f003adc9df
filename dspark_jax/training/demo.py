"""A tiny self-contained target and its own training data, for `configs/demo_tiny.py`.

The demo target is a 4-layer Llama with a 512-token vocabulary and random weights whose LM
head is scaled up so its next-token distributions are peaked, as a trained model's are (a
random head at the usual 0.02 scale predicts nearly uniform tokens, which any draft matches
from the start). Its training data are sequences it samples itself at T = 1 from random
prompts with this project's decoding code, supervised after the prompt, the way DeepSpec
regenerates answers with the target. The whole demo runs on a CPU in about a minute.
"""

from __future__ import annotations

import numpy as np

from dspark_jax.decoding.generate import generate_autoregressive
from dspark_jax.sampling import SamplingParams
from dspark_jax.models.config import from_hf_config
from dspark_jax.models.target import Target

DEMO_HF_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
HEAD_SCALE = 20.0  # logit std about 3 instead of 0.16


def demo_target(*, dtype="float32", mesh=None, seed: int = 0) -> Target:
    target = Target.random(from_hf_config(DEMO_HF_CONFIG, source="demo target"), seed=seed, dtype=dtype, mesh=mesh)
    params = dict(target.params, lm_head=target.params["lm_head"] * HEAD_SCALE)
    return Target(target.config, params, None, target.dtype, target.mesh)


def demo_examples(target: Target, *, count: int, prompt_length: int, max_length: int, seed: int) -> list[dict]:
    """`count` sequences of max_length tokens: a random prompt, then the target's own sample."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(2, target.config.vocab_size, (count, prompt_length)).tolist()
    answers = generate_autoregressive(target, prompts, max_new_tokens=max_length - prompt_length,
                                      sampling=SamplingParams(temperature=1.0), seed=seed, stop_ids=())
    examples = []
    for prompt, answer in zip(prompts, answers):
        ids = np.asarray(prompt + answer, np.int32)
        mask = np.arange(len(ids)) >= prompt_length
        examples.append({"input_ids": ids, "loss_mask": mask})
    return examples

