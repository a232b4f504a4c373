"""Turn `cfg.model` into a local directory (building the tiny model if asked).

Checks what would otherwise fail deep inside vLLM or DeepSpeed with an
obscure message: a missing dir, a missing tokenizer, an unsupported head_dim.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ttrl.models.tiny import ensure_tiny_model, tiny_spec


class ModelError(ValueError):
    """A model dir that cannot be used; the message names the path."""


def resolve_model_path(model_cfg: Any, data_cfg: Any = None, check: bool = True) -> str:
    """The local dir (or hub id) of the configured model; builds `tiny` and `tiny-arith`."""
    if model_cfg.path == "tiny-arith":
        from ttrl.config import SyntheticDataConfig
        from ttrl.models.warmstart import ensure_warmstart

        synth = data_cfg.synthetic if data_cfg is not None else SyntheticDataConfig()
        return str(ensure_warmstart(model_cfg, synth))
    if model_cfg.path == "tiny":
        t = model_cfg.tiny
        spec = tiny_spec(t.hidden_size, t.num_layers, t.num_heads, t.head_dim, t.intermediate_size, t.seed,
                         max_position_embeddings=max(4096, int(model_cfg.max_model_len)))
        return str(ensure_tiny_model(spec))
    path = Path(model_cfg.path).expanduser()
    if not path.exists():
        # A hub id: vLLM and transformers fetch it themselves (GPU clusters).
        return str(model_cfg.path)
    if check:
        check_model_dir(path)
    return str(path)


def check_model_dir(path: Path) -> None:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"model dir {path} has no config.json")
    tok_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / f).exists() for f in tok_files):
        raise ModelError(f"model dir {path} has no tokenizer (none of {', '.join(tok_files)})")
    cfg = json.loads(cfg_file.read_text())
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)
    if head_dim is not None and head_dim < 32:
        raise ModelError(f"model dir {path}: head_dim={head_dim} is below 32, which vLLM's attention does not support")


def weights_fingerprint(model_path: str, whole_up_to: int = 64 << 20) -> str | None:
    """The first 16 hex digits of a sha256 over a local model dir's weight files (names and bytes, sorted).

    Two runs with the same fingerprint started from the same weights. The
    tiny models are built where they run, and the same recipe gives other
    weights on another CPU (its float rounding), so runs that a report puts
    side by side as one warm start must agree on it. Weights over
    `whole_up_to` bytes in all (a real checkpoint: reading 15 GB would cost
    a start-up half a minute) are hashed by their names, sizes and first and
    last MiB. None for a hub id or a dir without safetensors/bin weights.
    """
    path = Path(model_path)
    files = sorted(f for f in path.glob("*") if f.suffix in (".safetensors", ".bin")) if path.is_dir() else []
    if not files:
        return None
    sizes = [f.stat().st_size for f in files]
    whole = sum(sizes) <= whole_up_to
    h = hashlib.sha256()
    for f, size in zip(files, sizes):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            if whole:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f"\0{size}\0".encode())
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
