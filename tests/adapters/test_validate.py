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


@pytest.mark.parametrize(("key", "value"), [("r", "8"), ("r", 0), ("r", True), ("lora_alpha", "32"), ("lora_alpha", None)])
def test_a_malformed_rank_or_alpha_is_refused_naming_the_field(tiny, tmp_path, key, value):
    import json

    get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=8, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(AdapterRejected, match=f"{key} must be"):
        check_shapes(tmp_path, tiny[0])
