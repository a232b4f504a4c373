"""Turn a problem into the prompt text the model sees.

`plain` fills `model.prompt_template`; `chat` applies the tokenizer's chat
template with `model.system_prompt` (the Qwen2.5-Math recipe).
"""

from __future__ import annotations

from typing import Any


def render_prompt(problem: str, model_cfg: Any, tokenizer: Any | None = None) -> str:
    if model_cfg.template == "plain":
        return model_cfg.prompt_template.replace("{problem}", problem)
    if tokenizer is None:
        raise ValueError("model.template=chat needs the tokenizer")
    messages = []
    if model_cfg.system_prompt:
        messages.append({"role": "system", "content": model_cfg.system_prompt})
    messages.append({"role": "user", "content": model_cfg.prompt_template.replace("{problem}", problem)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
