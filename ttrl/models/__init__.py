"""Model resolution: config -> a local model dir that HF and vLLM both load."""

from ttrl.models.resolve import resolve_model_path

__all__ = ["resolve_model_path"]
