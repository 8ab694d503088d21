"""A random LoRA adapter in PEFT's file layout, written without PEFT: benchmarks and the vLLM tests.

A served adapter's cost does not depend on what it learned, so a benchmark of adapter serving
needs only one with the real shapes; `.venv-vllm` has no PEFT, hence plain safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_random_lora(directory: Path, model_dir: Path, *, rank: int = 16, seed: int = 0, scale: float = 0.05,
                      modules: tuple[str, ...] = ATTENTION) -> None:
    """adapter_config.json and adapter_model.safetensors: rank-`rank` LoRA on the attention projections of every layer."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = head_dim * config["num_attention_heads"], head_dim * config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden)}  # (in, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name in modules:
            fan_in, fan_out = shapes[name]
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * scale
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": list(modules), "base_model_name_or_path": str(model_dir)}, indent=2))
