"""Multiple-choice evaluation (MMLU, C-Eval, user tasks) scored with lm-evaluation-harness' definitions."""
