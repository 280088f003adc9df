"""Target models against transformers' PyTorch Qwen3/Llama (golden fixtures + live when torch exists)."""

import jax
import numpy as np
import pytest

from dspark_jax import load_target
from tests.helpers import TINY_MODELS, golden, max_rel_err, norm_rel_err, tiny_path


def _run(name: str, dtype: str):
    target = load_target(tiny_path(name), dtype=dtype)
    g = golden(name)
    layers = tuple(range(target.config.num_layers))
    forward = jax.jit(target.forward, static_argnames="hidden_layers")
    logits, hidden, taps = forward(target.params, g["input_ids"], hidden_layers=layers)
    taps = np.moveaxis(np.asarray(taps, np.float32), 2, 0)  # [L, B, T, H] like the fixture
    return g, np.asarray(logits), np.asarray(hidden, np.float32), taps


@pytest.mark.parametrize("name", TINY_MODELS)
def test_fp32_matches_transformers(name):
    g, logits, hidden, taps = _run(name, "float32")
    assert logits.dtype == np.float32
    assert max_rel_err(logits, g["logits_fp32"]) <= 1e-5
    assert max_rel_err(hidden, g["last_hidden_fp32"]) <= 1e-5
    for layer in range(taps.shape[0]):
        assert max_rel_err(taps[layer], g["layers_fp32"][layer]) <= 1e-5, f"decoder layer {layer}"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_bf16_within_bf16_tolerance(name):
    g, logits, hidden, taps = _run(name, "bfloat16")
    # Against transformers in bf16: a few bf16 ulps of relative error, no more.
    assert norm_rel_err(logits, g["logits_bf16"]) <= 3e-2
    assert norm_rel_err(hidden, g["last_hidden_bf16"]) <= 3e-2
    assert norm_rel_err(taps, g["layers_bf16"]) <= 3e-2
    # Against the fp32 truth we are no less accurate than transformers' own bf16 run.
    ours = norm_rel_err(logits, g["logits_fp32"])
    theirs = norm_rel_err(g["logits_bf16"], g["logits_fp32"])
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_live_against_transformers(name):
    """Fresh random inputs through the PyTorch model (runs where torch is installed)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_path(name), dtype=torch.float32).eval()
    target = load_target(tiny_path(name), dtype="float32")
    ids = np.random.default_rng(7).integers(0, target.config.vocab_size, (3, 17)).astype(np.int32)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    layers = tuple(range(target.config.num_layers - 1))
    logits, hidden, taps = target.forward(target.params, ids, hidden_layers=layers)
    assert max_rel_err(logits, out.logits.numpy()) <= 1e-5
    assert max_rel_err(hidden, out.hidden_states[-1].numpy()) <= 1e-5
    for i, layer in enumerate(layers):  # HF hidden_states[l + 1] is the raw output of layer l
        assert max_rel_err(taps[:, :, i], out.hidden_states[layer + 1].numpy()) <= 1e-5


def test_embedding_tap_is_layer_minus_one():
    target = load_target(tiny_path("qwen3_gqa_untied"), dtype="float32")
    ids = np.array([[3, 1, 4, 1, 5]], np.int32)
    _, _, taps = target.forward(target.params, ids, hidden_layers=(-1, 2))
    np.testing.assert_array_equal(taps[0, :, 0], np.asarray(target.params["embed_tokens"])[ids[0]])
    with pytest.raises(ValueError, match="out of range"):
        target.forward(target.params, ids, hidden_layers=(3,))
