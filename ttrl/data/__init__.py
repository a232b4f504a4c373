"""Benchmarks, synthetic tasks, prompt templates and the prompt sampler (no ray/vllm)."""
