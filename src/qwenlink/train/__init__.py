"""Training: the job config, the loop, optimiser and schedules, loss, metrics (see docs/training.md)."""
