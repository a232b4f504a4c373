"""`ttrl-export`: merge a LoRA run's adapter into its base and write one plain Hugging Face model dir.

    ttrl-export outputs/demo_lora/.../checkpoints/step_40 --out merged/      # a checkpoint (its policy/)
    ttrl-export path/to/adapter --base Qwen/Qwen2.5-Math-7B --out merged/ --dtype bfloat16

A LoRA run's checkpoints keep the adapter alone (policy/ is a peft adapter
dir); what vLLM, transformers or another framework load without peft is the
merged model this writes: the base's weights plus each adapter's scaled
B @ A, and the base's tokenizer. The base is `--base`, or the one the
adapter names (its adapter_config.json). A full fine-tune's policy/ is a
model dir already: nothing to merge, said in one sentence (exit 2).

An entry module: the library never imports it; it imports torch, peft and
transformers only once the arguments are checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def adapter_dir(path: Path) -> Path:
    """The adapter dir a path names: itself, or a checkpoint's policy/; ValueError in one sentence otherwise."""
    from ttrl.rollout.lora import is_adapter_dir

    for cand in (path, path / "policy"):
        if is_adapter_dir(cand):
            return cand
    if (path / "config.json").exists() or (path / "policy" / "config.json").exists():
        raise ValueError(f"{path} holds a full model, not a LoRA adapter: it needs no merge")
    raise ValueError(f"{path} is neither an adapter dir (adapter_config.json) nor a checkpoint with one in policy/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttrl-export", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="an adapter dir, or a LoRA run's checkpoint dir")
    parser.add_argument("--out", type=Path, required=True, help="the merged model dir to write")
    parser.add_argument("--base", help="the base model dir or hub id (default: the one the adapter names)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="precision of the merged weights")
    args = parser.parse_args(argv)
    from ttrl.rollout.lora import read_base

    try:
        src = adapter_dir(args.adapter)
        base = args.base or read_base(src)
        if not base:
            raise ValueError(f"the adapter at {src} names no base model: pass --base")
        if args.out.exists() and any(args.out.iterdir()):
            raise ValueError(f"--out {args.out} is not empty")
        from ttrl.trainer.lora import merge

        merge(base, str(src), str(args.out), dtype=args.dtype)
    except ValueError as err:
        print(f"ttrl-export: {err}", file=sys.stderr)
        return 2
    print(f"ttrl-export: wrote {args.out} ({base} + the adapter at {src}, merged, {args.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
