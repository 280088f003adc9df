"""DeepSpec's dspark recipe for gemma4_12b (see dspark_jax/training/recipes.py)."""

from dspark_jax.training.recipes import reference_recipe

config = reference_recipe("dspark", "gemma4_12b")
