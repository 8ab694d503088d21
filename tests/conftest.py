"""Shared fixtures: the provisioned SmolLM2 directory, a tiny random Llama with its tokenizer, engines."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real default model, provisioned once under ./data (make test fetches it first)."""
    from rlhf_online.models.provision import fetch_default_model

    return fetch_default_model(DATA)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm_dir: Path) -> Path:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer, cached under ./data."""
    from rlhf_online.models.provision import make_tiny_model

    return make_tiny_model(smollm_dir, DATA / "models" / "tiny-random-llama", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """(model, tokenizer) of the tiny model, shared read-only by the tests."""
    from rlhf_online.models.provision import load_model

    return load_model(tiny_model_dir)


@pytest.fixture
def make_engine(tiny):
    """Build engines on the tiny model (a fresh copy of the weights each, since adapters modify it)."""
    import copy
    import time

    from rlhf_online.engine.engine import Engine, EngineConfig

    engines = []

    def make(model=None, step_delay: float = 0.0, **config):
        model = model if model is not None else copy.deepcopy(tiny[0])
        if step_delay:
            # The tiny model decodes in ~1 ms a step; a delay makes "long" requests really long.
            forward = model.forward

            def slow_forward(*args, **kwargs):
                time.sleep(step_delay)
                return forward(*args, **kwargs)

            model.forward = slow_forward
        engine = Engine(model, tiny[1], EngineConfig(**config)).start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop()


@pytest.fixture
def wait_queue_depth():
    """Block until the engine's queue holds `depth` requests (so a test knows its RPCs really arrived)."""
    import time

    from prometheus_client import REGISTRY

    def wait(depth: int, timeout: float = 10.0) -> None:
        end = time.time() + timeout
        while REGISTRY.get_sample_value("rlhf_generation_queue_depth") != depth:
            assert time.time() < end, "the request never reached the queue"
            time.sleep(0.01)

    return wait


@pytest.fixture(scope="session")
def encoder():
    """The reward model's sentence encoder, loaded once (it takes seconds)."""
    from rlhf_online.reward.encoder import TextEncoder

    return TextEncoder()
