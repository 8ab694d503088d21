"""Chat-template token ids the same way under both transformers lines (4.57 in .venv, 5.x beside vLLM)."""

from __future__ import annotations

from typing import Any


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template (transformers 5 returns a dict by default)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False)
    return list(ids)
