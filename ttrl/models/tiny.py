"""The tiny model: a randomly initialised Qwen2 with a byte-level tokenizer.

Built by the project itself (never downloaded) and cached under a directory
named by the hash of everything that determines its bytes, so two runs with
the same `model.tiny` config share one build and a changed config never
reuses a stale one. The build is written to a temporary dir and renamed into
place, so a crash mid-build leaves nothing half-written that a later run
could pick up. It must stay vLLM-compatible: head_dim >= 32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bump when the builder changes what it writes: old cache entries are ignored.
BUILDER_VERSION = 1

EOS = "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in byte order.

    Bytes that are visible Latin-1 characters stand for themselves; the rest
    (controls, space) are shifted past 255 so that every byte has a visible,
    unambiguous symbol. This is the convention Qwen2's tokenizer decodes.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {}
    shift = 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def cache_root() -> Path:
    """TTRL_CACHE, absolute, or ~/.cache/ttrl. An empty TTRL_CACHE (a script's `TTRL_CACHE=$UNSET`) is unset:
    read as a path it is the current directory, and a build there once landed in a git checkout."""
    given = os.environ.get("TTRL_CACHE", "").strip()
    return Path(given).expanduser().absolute() if given else Path.home() / ".cache" / "ttrl"


def tiny_spec(hidden_size: int, num_layers: int, num_heads: int, head_dim: int,
              intermediate_size: int, seed: int, max_position_embeddings: int = 4096) -> dict[str, Any]:
    if head_dim < 32:
        raise ValueError(f"model.tiny.head_dim={head_dim}: vLLM's CPU attention needs head_dim >= 32")
    if hidden_size != num_heads * head_dim:
        raise ValueError(
            f"model.tiny.hidden_size={hidden_size} must equal num_heads*head_dim={num_heads * head_dim}"
        )
    return {
        "builder": BUILDER_VERSION,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "seed": seed,
        "max_position_embeddings": max_position_embeddings,
        "tokenizer": "qwen2-bytes",
    }


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_byte_tokenizer():
    """A Qwen2 tokenizer with no merges: one token per byte, any text encodes.

    Being a real Qwen2Tokenizer (not a custom class) matters: transformers and
    vLLM pick the tokenizer class from the model type, and a Qwen2 model with
    a foreign tokenizer would be re-tokenized differently by each of them.
    """
    from transformers import Qwen2Tokenizer

    vocab = {EOS: 0}
    for sym in byte_symbols():
        vocab[sym] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], eos_token=EOS, pad_token=EOS, unk_token=EOS)


def write_tiny_model(spec: dict[str, Any], out_dir: Path) -> None:
    """Build the random model and tokenizer of `spec` into `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_byte_tokenizer()
    # A vocab padded to a multiple of 64 keeps matmuls aligned; the extra
    # rows are never produced by the tokenizer.
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(spec["seed"])
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "ttrl_spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))


def ensure_tiny_model(spec: dict[str, Any]) -> Path:
    """The cached dir of `spec`, building it first if needed (atomic rename)."""
    final = cache_root() / "models" / f"tiny-{spec_hash(spec)}"
    if not (final / "ttrl_spec.json").exists():
        build_in_place(final, lambda tmp: write_tiny_model(spec, tmp))
    return final


def build_in_place(final: Path, build: Callable[[Path], None], what: str | None = None) -> None:
    """Run `build` into a temporary dir beside `final`, then rename it to `final`.

    A killed build leaves only a `.tmp-` dir, which nothing reads. The build
    must end by writing final/ttrl_spec.json: its presence marks a finished one.
    Two processes that want the same build at once (sweep jobs, test workers)
    build it once: the second waits on a lock file beside it (an flock, which
    the kernel drops if its holder dies), then finds the first one's result,
    saying so first when `what` names the build.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.with_name(f".{final.name}.lock"), what and f"another process is building {what} "
               f"{final.name}; waiting for it"):
        if not (final / "ttrl_spec.json").exists():
            _build_once(final, build)


@contextlib.contextmanager
def _lock(path: Path, waiting: str | None):
    import fcntl

    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(final: Path, build: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same build first: theirs is identical.
            if not (final / "ttrl_spec.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
