"""Rows on several LoRA versions in one stacked pass: each row gets what its own version alone gives."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf_online.engine import lora_slots
from rlhf_online.engine.lora_mix import MixedLora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16])
def three_versions(tiny, request):
    """The tiny model (fp32, or bf16 as served, where PEFT keeps the LoRA weights fp32) with three random LoRAs:
    v1 and v2 of rank 8 (alphas 32 and 8: other scalings), v3 of rank 4."""
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny[0]).to(request.param), LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS,
                                                              init_lora_weights=False), adapter_name="v1")
    model.add_adapter("v2", LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("v3", LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


def _alone(model, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Logits of ids under one version through PEFT's own layers (None: the bare base)."""
    layers = lora_slots.lora_layers(model)
    for layer in layers.values():
        layer.enable_adapters(name is not None)
        if name is not None:
            layer.set_adapter([name], inference_mode=True)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_row_of_a_stacked_batch_gets_its_own_versions_logits(three_versions, tiny):
    model = three_versions
    ids = torch.tensor([tiny[1]("Tell me about the weather in the mountains.")["input_ids"]] * 5)
    rows = ["v1", "v2", "__base__", "v3", "v1"]
    expected = torch.cat([_alone(model, ids[i:i + 1], None if v == "__base__" else v) for i, v in enumerate(rows)])
    assert len({round(float(e.sum()), 3) for e in expected[:4]}) == 4  # four different policies

    layers = lora_slots.lora_layers(model)
    mix = MixedLora(layers, ["v1", "v2", "v3"])
    assert mix.rank == 8 + 8 + 4
    for layer in layers.values():
        layer.enable_adapters(False)
    with mix.applied(rows), torch.no_grad():
        got = model(input_ids=ids).logits
    assert got.dtype == expected.dtype == next(model.parameters()).dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the same fp32 LoRA math rounded to bf16 at each projection as PEFT rounds it (equal here; a kernel
        # summing in another order could move a rounding by one bf16 step on another CPU)
        torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)
    assert all(not layer._forward_hooks for layer in layers.values())  # the hooks leave with the pass


def test_the_mask_scales_each_rows_own_block_and_zeroes_the_rest(three_versions):
    layers = lora_slots.lora_layers(three_versions)
    mix = MixedLora(layers, ["v1", "v3"])
    mask = mix.mask(["v3", "__base__", "v1"])  # [3, 1, 12]
    assert mask.shape == (3, 1, 12)
    assert mask[0, 0, :8].eq(0).all() and mask[0, 0, 8:].eq(16 / 4).all()  # v3: alpha / r
    assert mask[1].eq(0).all()
    assert mask[2, 0, :8].eq(32 / 8).all() and mask[2, 0, 8:].eq(0).all()


def test_versions_that_adapt_different_modules_run_together(tiny):
    """A layer a version does not adapt keeps zero columns for it: its rows get the base projection there."""
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=4, target_modules=["q_proj"],
                                                              init_lora_weights=False), adapter_name="v1")
    model.add_adapter("v2", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.eval()
    ids = torch.tensor([tiny[1]("A short prompt.")["input_ids"]] * 2)
    expected = torch.cat([_alone(model, ids[:1], "v1"), _alone(model, ids[1:], "v2")])
    layers = lora_slots.lora_layers(model)
    mix = MixedLora(layers, ["v1", "v2"])
    for layer in layers.values():
        layer.enable_adapters(False)
    with mix.applied(["v1", "v2"]), torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
