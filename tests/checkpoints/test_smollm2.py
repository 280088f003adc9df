"""SmolLM2-135M-Instruct (real weights, GGUF Q4_1) against transformers' GGUF-loaded model."""

import json
import os

import jax
import numpy as np
import pytest

from dspark_jax.decoding.generate import generate_autoregressive
from dspark_jax.sampling import SamplingParams
from tests.helpers import FIXTURES


@pytest.fixture(scope="module")
def golden():
    with np.load(os.path.join(FIXTURES, "smollm2_golden.npz")) as z:
        return dict(z)


@pytest.fixture(scope="module")
def tokenizer_golden():
    with open(os.path.join(FIXTURES, "smollm2_tokenizer.json")) as f:
        return json.load(f)


def test_config_from_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope.theta, c.tie_word_embeddings) == (1536, 49152, 100000.0, True)
    assert c.num_params == sum(x.size for x in jax.tree.leaves(smollm2.params)) == 134_515_008


def test_logits_match_transformers(smollm2, golden):
    logits, _, _ = jax.jit(smollm2.forward)(smollm2.params, golden["prompt_ids"][None])
    logits = np.asarray(logits[0])  # [T, V]
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top5, golden["top_ids"][:, :5])
    ours_top20 = np.take_along_axis(logits, golden["top_ids"], axis=-1)
    max_abs = float(np.max(np.abs(ours_top20 - golden["top_logits"])))
    shift = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - shift).sum(-1)) + shift[:, 0]
    lse_err = float(np.max(np.abs(lse - golden["logsumexp"])))
    print(f"SmolLM2 vs transformers over {len(logits)} positions: max |logit diff| (top-20) {max_abs:.2e}, "
          f"max |logsumexp diff| {lse_err:.2e}")
    assert max_abs < 1e-3 and lse_err < 1e-3


def test_tokenizer_from_gguf_matches_reference(smollm2, tokenizer_golden):
    tok = smollm2.tokenizer
    for text, ids in zip(tokenizer_golden["texts"], tokenizer_golden["ids"]):
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == text
    rendered = tok.apply_chat_template(tokenizer_golden["chat"], add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer_golden["chat_rendered"]
    assert tok.encode(rendered, add_special_tokens=False) == tokenizer_golden["chat_ids"]


def test_greedy_answer_capital_of_france(smollm2, golden):
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == golden["france_ids"].tolist()
    out = generate_autoregressive(smollm2, [ids], max_new_tokens=24, sampling=SamplingParams(temperature=0.0))[0]
    assert out == golden["france_greedy"].tolist()
    assert tok.decode(out, skip_special_tokens=True) == "The capital of France is Paris."
