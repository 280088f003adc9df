"""DeepSpec's eagle3 recipe for qwen3_4b (see dspark_jax/training/recipes.py)."""

from dspark_jax.training.recipes import reference_recipe

config = reference_recipe("eagle3", "qwen3_4b")
