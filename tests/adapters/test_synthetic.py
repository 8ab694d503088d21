"""The random LoRA written without PEFT loads in PEFT, fits the model's shapes and changes its output."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel

from rlhf_online.adapters.synthetic import write_random_lora
from rlhf_online.adapters.validate import check_shapes


def test_random_lora_loads_in_peft_and_changes_the_logits(tiny, tiny_model_dir, tmp_path):
    model, _ = tiny
    write_random_lora(tmp_path / "lora", tiny_model_dir, rank=4, seed=1, scale=0.5)
    check_shapes(tmp_path / "lora", model)  # raises AdapterRejected on any mismatch
    adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "lora"))
    lora_keys = [k for k in adapted.state_dict() if "lora_" in k]
    assert len(lora_keys) == 2 * 4 * model.config.num_hidden_layers  # A and B on q/k/v/o of every layer
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(adapted(ids).logits, model(ids).logits)
