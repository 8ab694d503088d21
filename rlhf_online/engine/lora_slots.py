"""Reuse a retired version's LoRA layers for the next one: copy tensors instead of PEFT's module walk.

PEFT's `load_adapter` walks every module of the model, builds new (randomly initialised) LoRA
layers and then loads the state dict: 0.15-0.25 s for SmolLM2's 120 attention projections on an
idle 2-core machine, all of it on the engine thread, where every running row waits. A new version
with the same adapter config needs none of that: its tensors are read on the caller's thread
(`prepare`), and the engine thread copies them into the layers a retired version left behind
(`copy_into`), which takes milliseconds. The copy converts to the layers' own dtype, as PEFT's
load does: PEFT keeps LoRA weights in fp32 under a bf16 base, so the file's fp32 values are kept.

Layers can be reused when the config that shapes them and their scaling is the same (`signature`):
rank, alpha, rsLoRA, fan-in/fan-out, and the exact set of adapted modules. Anything PEFT builds
beyond plain A/B matrices (DoRA magnitudes, LoRA biases, per-module ranks or alphas, modules to
save) has no signature and always goes through PEFT.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

Signature = tuple[Any, ...]


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter read from disk onto the model's device, ready to be copied into reusable layers."""

    path: Path
    signature: Signature | None  # None: PEFT must build its layers
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # PEFT module name -> (A [r, in], B [out, r])


def signature(config: dict[str, Any], modules: frozenset[str]) -> Signature | None:
    """What two adapters must share for one's layers to hold the other; None if PEFT builds more than A and B."""
    if (config.get("peft_type") != "LORA" or _variant_requested(config) or config.get("lora_bias")
            or config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern")
            or config.get("modules_to_save") or type(config.get("r")) is not int
            or type(config.get("lora_alpha")) not in (int, float)):
        return None  # (a malformed r or alpha is PEFT's to refuse, never copied into layers)
    return (int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False)),
            bool(config.get("fan_in_fan_out", False)), modules)


def _variant_requested(config: dict[str, Any]) -> bool:
    """Whether PEFT builds a LoRA variant for this config (DoRA, aLoRA, ...), by its own rule: LoraConfig's fields
    tagged `is_lora_variant`, or an `init_lora_weights` value listed as one. Their layers' forward is not B(A(x))."""
    from peft import LoraConfig

    for field in dataclasses.fields(LoraConfig):
        if field.name == "init_lora_weights":
            if config.get(field.name) in field.metadata.get("lora_variants", ()):
                return True
        elif field.metadata.get("is_lora_variant") and config.get(field.name):
            return True
    return False


def prepare(path: Path, device: torch.device) -> PreparedAdapter:
    """Read the adapter's config and tensors (on the caller's thread: file reads off the engine), dtype as saved."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    a = {k.removesuffix(".lora_A.weight"): v for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    b = {k.removesuffix(".lora_B.weight"): v for k, v in tensors.items() if k.endswith(".lora_B.weight")}
    if a.keys() != b.keys() or len(a) + len(b) != len(tensors):
        return PreparedAdapter(path, None, {})  # unpaired or extra tensors: PEFT decides what they mean
    weights = {name: (a[name].to(device), b[name].to(device)) for name in a}
    return PreparedAdapter(path, signature(config, frozenset(weights)), weights)


def lora_layers(model: Any) -> dict[str, Any]:
    """PEFT module name -> LoRA layer, for every LoRA layer of the model (whatever adapters it holds)."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}


@torch.no_grad()
def copy_into(layers: dict[str, Any], slot: str, adapter: PreparedAdapter) -> None:
    """Overwrite slot's A and B with the adapter's in every layer that holds slot (same signature: same layers)."""
    layers = {name: layer for name, layer in layers.items() if slot in layer.lora_A}
    if layers.keys() != adapter.weights.keys():
        raise ValueError(f"adapter {adapter.path.name} adapts other modules than layer slot {slot!r} holds")
    for name, (a, b) in adapter.weights.items():
        layers[name].lora_A[slot].weight.copy_(a)
        layers[name].lora_B[slot].weight.copy_(b)
