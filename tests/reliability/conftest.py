"""Reliability fixtures: in-process servers of the three services, PostgreSQL schemas, adapters, certificates."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import make_pki, pg_schema, sample, wait_for

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# What a client-facing message must never hold: a filesystem path, a file of a version, a stack trace, SQL,
# the store's driver. Case matters for SQL: messages say "from" in prose, statements say FROM.
LEAKS = [re.compile(p) for p in (r"/[\w.-]+/", r"\.safetensors", r"\.json\b", r"\.db\b", r"Traceback", r'File "',
                                 r"\bSELECT\b", r"\bINSERT\b", r"\bUPDATE\b", r"\bDELETE\b", r"\bFROM\b",
                                 r"\bsqlite3?\b", r"psycopg")]


def leaks(details: str, sent: str = "") -> list[str]:
    """What in a client-facing message shows the server's insides ([] if nothing); `sent`, the client's own
    input echoed back, does not count."""
    shown = details.replace(sent, "") if sent else details
    return [m[0] for pattern in LEAKS if (m := pattern.search(shown))]


def rpc_code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of a call; OK and "" when it returned."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""




def rpcs(service: str, method: str, code: str) -> float:
    """RPCs of one method that ended with `code`, as the metrics interceptor counted them."""
    return sample("rlhf_grpc_requests_total", service=service, method=method, code=code)




# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Generation:
    """A running in-process generation server and what tests poke at."""

    running: Any
    stub: Any
    channel: grpc.Channel
    engine: Any
    store: Any
    settings: Any
    watcher: Any  # its AdapterWatcher


def slow_model(model: Any, step_delay: float) -> Any:
    """The model with a sleep before each forward, so generations take long enough to interrupt."""
    if step_delay:
        forward = model.forward

        def slow_forward(*args: Any, **kwargs: Any) -> Any:
            time.sleep(step_delay)
            return forward(*args, **kwargs)

        model.forward = slow_forward
    return model


def start_generation(tiny: Any, root: Path, step_delay: float = 0.0, **overrides: Any) -> Generation:
    """A generation server on a fresh copy of the tiny model, configured exactly as production derives it."""
    from rlhf_online.config import GenerationSettings
    from rlhf_online.engine.engine import Engine
    from rlhf_online.store import open_store
    from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
    from services.bootstrap import engine_config
    from services.generation import start_generation_server

    root.mkdir(parents=True, exist_ok=True)
    values = {"port": 0, "metrics_port": 0, "host": "127.0.0.1", "data_dir": root, "base_model": "tiny",
              "store_url": f"sqlite:///{root / 'store.db'}", "grace_seconds": 5, **overrides}
    settings = GenerationSettings(**values)
    engine = Engine(slow_model(copy.deepcopy(tiny[0]), step_delay), tiny[1], engine_config(settings)).start()
    store = open_store(settings.store_url)
    running = start_generation_server(settings, engine, store)
    channel = secure_or_plain_channel(running.port, settings)
    return Generation(running, pb_grpc.GenerationStub(channel), channel, engine, store, settings, watcher_of(running))


def watcher_of(running: Any) -> Any:
    """The adapter watcher a generation server stops when it drains."""
    from rlhf_online.adapters.watcher import AdapterWatcher

    [watcher] = [f.__self__ for f in running.on_drain if isinstance(getattr(f, "__self__", None), AdapterWatcher)]
    return watcher


def secure_or_plain_channel(port: int, settings: Any, client: Any = None) -> grpc.Channel:
    """A channel to a local server: TLS as `client` (a ClientTLS) says, else trusting its own certificate if it serves TLS."""
    if client is not None:
        from rlhf_online.tls import channel

        return channel(f"localhost:{port}", client)
    if settings.tls_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_cert).read_bytes())
        return grpc.secure_channel(f"localhost:{port}", creds)
    return grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def generation(tiny, tmp_path) -> Iterator[Callable[..., Generation]]:
    """start(step_delay=0, **settings) -> a generation server; all are shut down after the test."""
    started: list[Generation] = []

    def start(step_delay: float = 0.0, **overrides: Any) -> Generation:
        g = start_generation(tiny, tmp_path / f"gen{len(started)}", step_delay, **overrides)
        started.append(g)
        return g

    yield start
    for g in started:
        g.running.shutdown(1)


def start_reward(root: Path, client: Any = None, **overrides: Any) -> tuple[Any, Any, Any]:
    """A reward server on the cheap built-in `sentiment` reward: (stub, runtime, running); `client`: the stub's ClientTLS."""
    from rlhf_online.config import RewardSettings, project
    from rlhf_online.reward.runtime import RewardConfig, RewardRuntime
    from rlhf_online.store import open_store
    from rlhf_online.v1 import reward_pb2_grpc as pb_grpc
    from services.reward import start_reward_server

    root.mkdir(parents=True, exist_ok=True)
    values = {"port": 0, "metrics_port": 0, "host": "127.0.0.1", "data_dir": root, "reward_model": "sentiment",
              "store_url": f"sqlite:///{root / 'store.db'}", **overrides}
    settings = RewardSettings(**values)
    runtime = RewardRuntime(project(RewardConfig, settings), open_store(settings.store_url))
    running = start_reward_server(settings, runtime)
    return pb_grpc.RewardStub(secure_or_plain_channel(running.port, settings, client)), runtime, running


def start_trainer(tiny: Any, root: Path, reward: Callable | None = None, prompts: int = 2,
                  reward_not_ready: Callable[[], str] | None = None, **overrides: Any) -> tuple[Any, Any, Any]:
    """A trainer server on the tiny model with a scripted reward: (stub, registry, running)."""
    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.config import TrainerSettings, assemble
    from rlhf_online.mainthread import MainThreadRunner
    from rlhf_online.ppo.trainer import Trainer
    from rlhf_online.store import CompletionRecord, open_store
    from rlhf_online.v1 import trainer_pb2_grpc as pb_grpc
    from services.trainer import start_trainer_server

    root.mkdir(parents=True, exist_ok=True)
    values = {"port": 0, "metrics_port": 0, "host": "127.0.0.1", "data_dir": root, "base_model": "tiny",
              "store_url": f"sqlite:///{root / 'store.db'}", "round_interval_seconds": 0, "round_min_feedback": 0,
              "batch_size": 4, "response_length": 6, "eval_prompts": 4, **overrides}
    settings = assemble(TrainerSettings, values)
    store = open_store(settings.store_url)
    store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about thing {i}.", messages=(),
                                            text="ok", policy_version="") for i in range(prompts)])
    registry = AdapterRegistry(settings.adapter_dir)
    reward = reward or (lambda prompts, texts, ids=(): [len(t) / 100 for t in texts])
    trainer = Trainer(settings.trainer, settings.ppo, store, registry, reward,
                      lambda: (copy.deepcopy(tiny[0]), tiny[1]), base_model=settings.base_model,
                      reward_not_ready=reward_not_ready)
    running = start_trainer_server(settings, trainer, registry, MainThreadRunner())
    return pb_grpc.TrainerStub(secure_or_plain_channel(running.port, settings)), registry, running


# ---------------------------------------------------------------------------------------------- stores


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL to a fresh, empty PostgreSQL schema of its own (dropped after the test)."""
    with pg_schema("rel") as url:
        yield url


# ---------------------------------------------------------------------------------------------- adapters


@pytest.fixture(scope="session")
def lora_dirs(tiny, tmp_path_factory) -> dict[str, Path]:
    """Saved PEFT adapters: `good0`..`good2` (random LoRAs of the tiny model) and `other_shapes` (another model's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("loras")
    out = {}
    for seed in range(3):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=8, lora_alpha=32, target_modules=LORA_TARGETS,
                                                                  init_lora_weights=False))
        model.save_pretrained(root / f"good{seed}")
        out[f"good{seed}"] = root / f"good{seed}"
    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=8, target_modules=LORA_TARGETS, init_lora_weights=False)).save_pretrained(
        root / "other_shapes")
    out["other_shapes"] = root / "other_shapes"
    return out


def copy_into(src: Path) -> Callable[[Path], None]:
    """A registry writer that copies a saved adapter's files."""

    def write(directory: Path) -> None:
        for p in src.iterdir():
            if p.is_file():
                shutil.copy(p, directory / p.name)

    return write


# ---------------------------------------------------------------------------------------------- TLS


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (openssl, valid one day)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(certificate, key) the servers under test present."""
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def other_cert(tmp_path_factory) -> Path:
    """A certificate the servers do not have: a client trusting only it must refuse to talk to them."""
    return self_signed(tmp_path_factory.mktemp("tls-other"), "other")[0]


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> tuple[Any, Any]:
    """(ours, rogue): two throwaway CAs, each with a server (localhost, 127.0.0.1) and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    return make_pki(root, "ours"), make_pki(root, "rogue")


@pytest.fixture(scope="session")
def kit():
    """The helpers of this file, for test modules (which cannot import conftest under importlib mode)."""

    class Kit:
        code = staticmethod(rpc_code)
        sample = staticmethod(sample)
        rpcs = staticmethod(rpcs)
        wait_for = staticmethod(wait_for)
        start_generation = staticmethod(start_generation)
        start_reward = staticmethod(start_reward)
        start_trainer = staticmethod(start_trainer)
        copy_into = staticmethod(copy_into)
        self_signed = staticmethod(self_signed)
        channel = staticmethod(secure_or_plain_channel)
        leaks = staticmethod(leaks)

    return Kit
