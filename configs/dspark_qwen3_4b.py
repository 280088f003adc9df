"""DeepSpec's dspark recipe for qwen3_4b (see dspark_jax/training/recipes.py)."""

from dspark_jax.training.recipes import reference_recipe

config = reference_recipe("dspark", "qwen3_4b")
