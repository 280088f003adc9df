"""Target and draft model definitions (pure-functional Flax Linen)."""
