"""dspark_jax: DSpark speculative decoding (drafters, training, evaluation, serving) in JAX."""

import os

# transformers serves only tokenizers and chat templates here; its advice that PyTorch is
# missing does not apply.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from dspark_jax.checkpoints.deepspec import load_draft, save_draft
from dspark_jax.checkpoints.target import load_target
from dspark_jax.decoding.generate import GenerationResult, generate
from dspark_jax.models.config import ModelConfig
from dspark_jax.models.draft import Draft
from dspark_jax.models.draft_config import DraftConfig
from dspark_jax.models.kv_cache import KVCache
from dspark_jax.models.target import Target

__all__ = [
    "Draft",
    "DraftConfig",
    "GenerationResult",
    "KVCache",
    "ModelConfig",
    "Target",
    "generate",
    "load_draft",
    "load_target",
    "save_draft",
]
