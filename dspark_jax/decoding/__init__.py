"""Sampling and generation loops."""
