"""DeepSpec's dflash recipe for qwen3_8b (see dspark_jax/training/recipes.py)."""

from dspark_jax.training.recipes import reference_recipe

config = reference_recipe("dflash", "qwen3_8b")
