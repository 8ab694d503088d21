"""Checks an adapter must pass before it is loaded into a serving model: integrity, base model, shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from rlhf_online.artifacts import verify_dir


class AdapterRejected(ValueError):
    """The adapter must not be served; the message says why."""


def validate_adapter(directory: Path, *, base_model: str, model: Any) -> dict:
    """The manifest of an adapter that matches its hashes, names our base model, and fits the model's shapes."""
    try:
        manifest = verify_dir(directory)
    except ValueError as e:
        raise AdapterRejected(str(e)) from None
    if manifest.get("base_model") != base_model:
        raise AdapterRejected(f"{directory.name}: trained for base model {manifest.get('base_model')!r}, "
                              f"this replica serves {base_model!r}")
    check_shapes(directory, model)
    return manifest


def _base_modules(model: Any) -> dict[str, Any]:
    """Module name -> module of the plain base model, seeing through PEFT wrappers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(base.named_modules())


def check_shapes(directory: Path, model: Any) -> None:
    """Every LoRA A/B tensor must fit the in/out features of the module it adapts."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = safe_open(str(directory / "adapter_model.safetensors"), framework="pt")
    except Exception as e:  # missing, truncated or not safetensors at all
        raise AdapterRejected(f"{directory.name}: unreadable adapter files ({e})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(f"{directory.name}: not a LoRA adapter ({config.get('peft_type')!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)  # PEFT's default alpha
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterRejected(f"{directory.name}: adapter_config.json r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterRejected(f"{directory.name}: adapter_config.json lora_alpha must be a number, got {alpha!r}")
    if config.get("use_dora"):  # PEFT refuses to batch DoRA with other versions, as every swap and canary does
        raise AdapterRejected(f"{directory.name}: a DoRA adapter (use_dora); replicas serve plain LoRA only")
    modules = _base_modules(model)
    checked = 0
    for key in tensors.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
        # base_model.model.<module path>.lora_A.weight -> <module path>
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        path = key.split(".lora_")[0].removeprefix("base_model.model.")
        module = modules.get(path)
        module = getattr(module, "base_layer", module)
        if module is None or not hasattr(module, "in_features"):
            raise AdapterRejected(f"{directory.name}: adapts {path!r}, which this model does not have")
        shape = tuple(tensors.get_slice(key).get_shape())
        want = (rank, module.in_features) if ".lora_A." in key else (module.out_features, rank)
        if shape != want:
            raise AdapterRejected(f"{directory.name}: {key} has shape {shape}, the model needs {want}")
        checked += 1
    if checked == 0:
        raise AdapterRejected(f"{directory.name}: no LoRA weights in adapter_model.safetensors")
