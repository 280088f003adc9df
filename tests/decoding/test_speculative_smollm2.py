"""Speculative decoding on SmolLM2's real weights equals its greedy autoregressive output."""

import pytest

from dspark_jax import Draft, generate
from dspark_jax.decoding.scheduler import PrefixScheduler
from dspark_jax.models.draft_config import draft_config_for_target


# Speculative decoding on SmolLM2 runs with the slow tests (every drafter runs on the tiny
# target in CI: tests/decoding/test_speculative.py; SmolLM2's greedy tokens through the engine:
# tests/serving/test_engine.py).
@pytest.mark.parametrize("algorithm,with_scheduler", [
    pytest.param("dspark", False, marks=pytest.mark.slow), pytest.param("dspark", True, marks=pytest.mark.slow),
    pytest.param("dflash", False, marks=pytest.mark.slow),
    pytest.param("eagle3", False, marks=pytest.mark.slow)])
def test_smollm2_greedy_equals_autoregressive(smollm2, algorithm, with_scheduler):
    """Real weights and chat prompts, with a random draft of each kind (shared embedding)."""
    tok = smollm2.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
               for m in ("What is the capital of France?", "Compute 12 * 7 and explain briefly.")]
    config = draft_config_for_target(smollm2.config, algorithm, (1, 8, 15, 22, 28),
                                     mask_token_id=smollm2.config.vocab_size - 1)
    draft = Draft.random(config, target=smollm2, seed=0, dtype="float32")
    scheduler = PrefixScheduler(tuple(0.9 ** i for i in range(64))) if with_scheduler else None
    ar = generate(smollm2, None, prompts, max_new_tokens=24, temperature=0.0)
    spec = generate(smollm2, draft, prompts, max_new_tokens=24, temperature=0.0, scheduler=scheduler)
    assert spec.tokens == ar.tokens
    assert tok.decode(ar.tokens[0], skip_special_tokens=True) == "The capital of France is Paris."
