"""Model definitions: single-device Qwen2 modules, presets and configs."""
