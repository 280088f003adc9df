"""Paths of the golden fixtures and error metrics shared by the tests."""

import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_MODELS = ("qwen3_gqa_untied", "qwen3_mha_tied", "llama_gqa_llama3rope", "llama_tied_sharded",
               "gemma4_sliding_k_eq_v", "gemma4_untied_v_proj")


def tiny_path(name: str) -> str:
    return os.path.join(FIXTURES, "tiny", name)


def golden(name: str) -> dict:
    with np.load(os.path.join(tiny_path(name), "golden.npz")) as z:
        return dict(z)


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the largest error relative to the tensor's scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def norm_rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref||."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
