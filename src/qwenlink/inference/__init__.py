"""Inference: KV-cache generation."""
