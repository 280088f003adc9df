"""Training data: conversations and loss masks, the grain pipeline, the offline target cache, answer regeneration."""
