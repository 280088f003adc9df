"""Draft training: recipes, losses, optimizer, the sharded train step and the trainer loop."""
