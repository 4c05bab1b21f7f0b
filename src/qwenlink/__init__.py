"""qwenlink: train, convert, serve and evaluate Qwen1.5-family models on PyTorch's native distributed stack."""

__version__ = "0.1.0"
