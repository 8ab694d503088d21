"""The engine interface: the embedded engine implements it; the vLLM engine's mapping helpers (no vLLM needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rlhf_online.config import GenerationSettings
from rlhf_online.engine.interface import ServingEngine, eos_ids_of
from rlhf_online.engine.vllm_engine import adapter_rank, finish_reason_of
from rlhf_online.errors import ConfigError


def test_the_embedded_engine_is_a_serving_engine(make_engine):
    engine = make_engine()
    assert isinstance(engine, ServingEngine)
    assert engine.dtype_name == "float32" and engine.device_type == "cpu"
    assert engine.module_tree is engine.model
    ids = engine.encode_messages([("user", "hello")])
    assert ids == engine.encode_prompt("hello")  # a plain prompt is one user turn


def test_eos_ids_join_the_tokenizer_and_the_generation_config():
    tok = SimpleNamespace(eos_token_id=2)
    assert eos_ids_of(tok, SimpleNamespace(eos_token_id=[2, 7])) == {2, 7}
    assert eos_ids_of(tok, SimpleNamespace(eos_token_id=None)) == {2}
    assert eos_ids_of(tok, None) == {2}


@pytest.mark.parametrize(("reason", "stop_reason", "want"), [
    ("length", None, "length"),
    ("stop", None, "eos"),  # an EOS token
    ("stop", 2, "eos"),  # one of stop_token_ids (the model's EOS ids)
    ("stop", ".", "stop"),  # a stop string
    ("abort", None, None),  # cancelled or expired: the request ends without a finished candidate
    (None, None, None),  # still running
])
def test_vllm_finish_reasons_map_to_ours(reason, stop_reason, want):
    assert finish_reason_of(SimpleNamespace(finish_reason=reason, stop_reason=stop_reason)) == want


def test_adapter_rank_reads_the_largest_rank(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 32}}))
    assert adapter_rank(tmp_path) == 32


@pytest.mark.parametrize(("field", "value", "message"), [
    ("engine", "tgi", "embedded or vllm"),
    ("max_loras", 1, ">= 2"),
    ("tensor_parallel_size", 0, ">= 1"),
    ("gpu_memory_utilization", 1.5, "in (0, 1]"),
])
def test_engine_settings_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=field) as e:
        GenerationSettings(**{field: value}).validate()
    assert message in str(e.value)
