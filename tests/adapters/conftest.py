"""Adapter fixtures: random (non-identity) LoRAs for the tiny model, published into a registry."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf_online.adapters.registry import AdapterRegistry


@pytest.fixture(scope="session")
def lora_models(tiny):
    """Three different random LoRAs on q/k/v/o of the tiny model."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         init_lora_weights=False)
        models.append(get_peft_model(copy.deepcopy(tiny[0]), cfg))
    return models


@pytest.fixture
def registry(tmp_path):
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def publish(registry, lora_models):
    """publish(k, base_model="tiny") -> version of LoRA number k."""

    def pub(k: int, base_model: str = "tiny", parent: str = "") -> str:
        return registry.publish(lora_models[k].save_pretrained, base_model=base_model, parent=parent,
                                metrics={"objective/rlhf_reward": float(k)})

    return pub
