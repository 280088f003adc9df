"""dspark_jax: DSpark speculative decoding (drafters, training, evaluation, serving) in JAX."""

from dspark_jax.models.config import ModelConfig
from dspark_jax.models.kv_cache import KVCache
from dspark_jax.models.target import Target, load_target

__all__ = ["KVCache", "ModelConfig", "Target", "load_target"]
