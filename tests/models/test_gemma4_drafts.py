"""Gemma4 drafters against the reference's own PyTorch Gemma4DSparkModel / Gemma4Eagle3Model
(golden fixtures written by scripts/make_parity_fixtures.py --deepspec from random weights)."""

import json
import os

import jax
import numpy as np
import pytest

from dspark_jax import load_draft, save_draft
from dspark_jax.models.config import ConfigError
from tests.helpers import FIXTURES, max_rel_err


def _load(name: str):
    path = os.path.join(FIXTURES, "gemma4_drafts", name)
    return load_draft(path, dtype="float32"), dict(np.load(os.path.join(path, "golden.npz")))


def test_dspark_training_forward_matches_the_reference():
    draft, g = _load("dspark")
    assert draft.config.algorithm == "dspark" and draft.config.layers.gemma
    spec = draft.config.layers.layer_spec(0)
    assert (spec.head_dim, spec.num_kv_heads, spec.k_eq_v, spec.window) == (32, 1, True, None)
    logits, conf, _ = jax.jit(draft.block_forward)(draft.params, g["features"], g["input_ids"], g["anchors"], g["keep"])
    keep = g["keep"].astype(bool)  # dropped blocks are never scored
    assert max_rel_err(np.asarray(logits)[keep], g["draft_logits"][keep]) <= 1e-5
    assert max_rel_err(np.asarray(conf)[keep], g["confidence"][keep]) <= 1e-5


def test_eagle3_layer_matches_the_reference():
    draft, g = _load("eagle3")
    assert draft.config.algorithm == "eagle3" and draft.config.layers.gemma
    outs = jax.jit(draft.ttt_forward)(draft.params, g["features"], g["input_ids"])  # [G, B, S, H]
    logits = draft.logits(draft.params, outs[0])
    assert max_rel_err(np.asarray(logits), g["step0_logits"]) <= 1e-5


def test_gemma4_drafts_save_and_load_back(tmp_path):
    for name in ("dspark", "eagle3"):
        draft, _ = _load(name)
        save_draft(draft, str(tmp_path / name))
        again = load_draft(str(tmp_path / name), dtype="float32")
        assert again.config == draft.config
        saved = json.load(open(tmp_path / name / "config.json"))
        assert saved["architectures"] == [f"Gemma4{'Eagle3' if name == 'eagle3' else 'DSpark'}Model"]
        jax.tree.map(np.testing.assert_array_equal, again.params, draft.params)


def test_a_draft_copied_from_a_unified_config_keeps_its_defaults():
    """DeepSpec copies gemma-4-12B-it's gemma4_unified_text config into the draft's; a key left
    at that type's default (no per-layer inputs) must not take gemma4_text's (256 of them)."""
    from dspark_jax.models.draft_config import draft_from_hf

    with open(os.path.join(FIXTURES, "gemma4_drafts", "dspark", "config.json")) as f:
        cfg = json.load(f)
    del cfg["hidden_size_per_layer_input"]
    assert draft_from_hf({**cfg, "model_type": "gemma4_unified_text"}).layers.gemma
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input=256"):
        draft_from_hf(cfg)
