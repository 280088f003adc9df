"""dspark for SmolLM2-135M-Instruct (see dspark_jax/training/recipes.py)."""

from dspark_jax.training.recipes import smollm2_recipe

config = smollm2_recipe("dspark")
