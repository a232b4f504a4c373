"""ttrl: reinforcement learning of LLMs at test time, without labels.

The top-level package imports nothing heavy (no torch, ray, vllm or
deepspeed) so that `import ttrl` and the pure-core unit tests stay fast.
"""

__version__ = "0.1.0"
