"""Checkpoints: HF safetensors directories, Megatron layouts, DCP training state, safe loading."""
