"""Loggers (JSON lines, W&B) and label-quality metrics."""
