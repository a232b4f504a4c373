"""Evaluation: pass@k / maj@k metrics and the `ttrl-eval` entry."""
