"""Which adapters may reuse another's LoRA layers, and what prepare reads."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from rlhf_online.engine import lora_slots

PLAIN = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "target_modules": ["q_proj"]}
MODULES = frozenset({"base_model.model.model.layers.0.self_attn.q_proj"})


def test_plain_loras_of_one_shape_share_a_signature_and_anything_else_changes_it():
    same = lora_slots.signature(dict(PLAIN, lora_dropout=0.1), MODULES)  # dropout: training only
    assert same == lora_slots.signature(PLAIN, MODULES) is not None
    for change in ({"r": 4}, {"lora_alpha": 32}, {"use_rslora": True}, {"fan_in_fan_out": True}):
        assert lora_slots.signature(dict(PLAIN, **change), MODULES) != same, change
    assert lora_slots.signature(PLAIN, MODULES | {"base_model.model.model.layers.0.self_attn.k_proj"}) != same


def test_what_peft_builds_beyond_a_and_b_is_never_reused():
    for extra in ({"use_dora": True}, {"lora_bias": True}, {"bias": "all"}, {"rank_pattern": {"q_proj": 4}},
                  {"alpha_pattern": {"q_proj": 4}}, {"modules_to_save": ["lm_head"]}, {"peft_type": "IA3"},
                  {"alora_invocation_tokens": [1, 2]}, {"use_bdlora": True}, {"init_lora_weights": "mica"}):
        assert lora_slots.signature(dict(PLAIN, **extra), MODULES) is None, extra


def test_prepare_reads_pairs_and_leaves_unpaired_tensors_to_peft(tmp_path):
    name = next(iter(MODULES))
    (tmp_path / "adapter_config.json").write_text(json.dumps(PLAIN))
    save_file({f"{name}.lora_A.weight": torch.ones(8, 4), f"{name}.lora_B.weight": torch.ones(6, 8)},
              str(tmp_path / "adapter_model.safetensors"))
    prepared = lora_slots.prepare(tmp_path, torch.device("cpu"))
    a, b = prepared.weights[name]
    assert (a.shape, b.shape, a.dtype) == ((8, 4), (6, 8), torch.float32)  # as saved: the copy converts, as PEFT
    assert prepared.signature == lora_slots.signature(PLAIN, MODULES)
    save_file({f"{name}.lora_A.weight": torch.ones(8, 4)}, str(tmp_path / "adapter_model.safetensors"))
    assert lora_slots.prepare(tmp_path, torch.device("cpu")).signature is None


def test_a_rank_or_alpha_of_the_wrong_type_has_no_signature():
    for change in ({"r": "8"}, {"lora_alpha": "16"}, {"r": 8.0}):
        assert lora_slots.signature(dict(PLAIN, **change), MODULES) is None, change
