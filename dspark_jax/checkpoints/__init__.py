"""Checkpoint formats: transformers safetensors directories and GGUF files."""
