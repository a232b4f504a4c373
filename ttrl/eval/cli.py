"""`ttrl-eval`: evaluate a model or checkpoint on a benchmark with k samples per problem.

    ttrl-eval model=qwen2.5-math-1.5b data=math500 eval.n_samples=16 eval.ks=[1,4,16]
    ttrl-eval eval.checkpoint=outputs/demo/.../checkpoints/step_80/policy experiment=demo
    ttrl-eval eval.checkpoint=outputs/demo_lora/.../checkpoints/step_80/policy experiment=demo_lora
        (a LoRA checkpoint's policy/ is an adapter: it is served on the base, model.path)
    ttrl-eval ... eval.greedy=true

Writes `eval.json` (pass@1, pass@k, maj@k with standard errors, settings)
and `eval_problems.jsonl` (one line per problem: answers, correctness, vote)
into the run dir. One vLLM engine in this process; no Ray, no trainer.
An entry module: the library never imports it, and importing it does
nothing (the schema is registered in `main()`, before Hydra composes).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ttrl.cli import CONF_DIR, run_hydra
from ttrl.config import ConfigError, register_configs, validate


def run_eval(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    from ttrl.eval.runner import evaluate
    from ttrl.labeling.extract import configured_extractor
    from ttrl.parts import build_parts
    from ttrl.rollout.lora import is_adapter_dir
    from ttrl.step import token_ids

    e = cfg.eval
    if e.checkpoint and is_adapter_dir(e.checkpoint):
        # An adapter (a LoRA run's policy/): the base stays model.path, the engine serves it with the adapter.
        cfg = OmegaConf.merge(cfg, {"model": {"lora": {"enabled": True, "path": e.checkpoint}}})
    elif e.checkpoint:
        cfg = OmegaConf.merge(cfg, {"model": {"path": e.checkpoint}})
    parts = build_parts(cfg)
    try:
        engine = parts.local_engine()
        t0 = time.perf_counter()
        summary, records = evaluate(engine.generate, parts.prompts, token_ids(parts.tokenizer, parts.prompts),
                                    n=e.n_samples, temperature=e.temperature, top_p=e.top_p,
                                    max_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens, ks=list(e.ks),
                                    greedy=e.greedy, extractor=configured_extractor(cfg.label))
    finally:
        parts.close()
    result = {
        "model": parts.model_path, "adapter": cfg.model.lora.path if cfg.model.lora.enabled else None,
        "data": cfg.data.name, "n_samples": 1 if e.greedy else e.n_samples,
        "temperature": 0.0 if e.greedy else e.temperature, "top_p": e.top_p, "greedy": e.greedy,
        "metrics": summary, "wall_s": time.perf_counter() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    with (out_dir / "eval_problems.jsonl").open("w") as fh:
        for rec in records:
            fh.write(json.dumps({k: v for k, v in rec.items() if k != "classes"}) + "\n")
    line = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if "@" in k and "stderr" not in k)
    print(f"ttrl-eval: {len(records)} problems: {line}; wrote {out_dir / 'eval.json'}", file=sys.stderr)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"ttrl-eval: config error: {err}", file=sys.stderr)
        sys.exit(2)
    from ttrl.parts import SetupError

    try:
        run_eval(cfg, Path(HydraConfig.get().runtime.output_dir))
    except SetupError as err:
        print(f"ttrl-eval: cannot start: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()  # at call, not import: see ttrl/train.py's main()
    run_hydra(_main, "ttrl-eval")


if __name__ == "__main__":
    main()
