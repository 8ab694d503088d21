"""What validate_adapter refuses before a replica loads anything."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig, get_peft_model

from rlhf_online.adapters.validate import AdapterRejected, check_shapes


def test_a_dora_adapter_is_refused_with_the_reason(tiny, tmp_path):
    cfg = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    get_peft_model(copy.deepcopy(tiny[0]), cfg).save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterRejected, match="DoRA adapter"):
        check_shapes(tmp_path / "dora", tiny[0])
    get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "lora")
    check_shapes(tmp_path / "lora", tiny[0])  # the same without DoRA passes
