"""Evaluation: generation, task metrics, the eval stage and its report."""
