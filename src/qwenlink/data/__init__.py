"""Data: Megatron indexed datasets, preprocessing, templates and training datasets."""
