"""Shared fixtures: the provisioned SmolLM2 directory, a tiny random Llama with its tokenizer, engines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

# The vLLM engine's tests run in .venv-vllm (`make test-vllm`, part of `make test`); where vLLM is not
# installed (.venv) they are not collected at all, rather than skipped.
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["*/test_vllm*.py"]

# Skips that depend on the machine and are accepted where RLHF_FAIL_ON_SKIP=1 (CI sets it): substrings of
# the skip reason. Empty: on the project's machines (kubectl in the image, prometheus from Debian, installed
# by `make test`) every test must run, so a skip means an install step went missing.
ALLOWED_SKIPS: tuple[str, ...] = ()
_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember every skipped test with its reason."""
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With RLHF_FAIL_ON_SKIP=1, a skip outside ALLOWED_SKIPS fails the run (pytest -rs lists them all)."""
    import os

    if os.environ.get("RLHF_FAIL_ON_SKIP") != "1":
        return
    unexpected = [(n, r) for n, r in _skipped if not any(a in r for a in ALLOWED_SKIPS)]
    if unexpected:
        print(f"\nRLHF_FAIL_ON_SKIP=1: {len(unexpected)} test(s) skipped that must run here "
              f"(install what each reason names, or add it to ALLOWED_SKIPS in tests/conftest.py):")
        for nodeid, reason in unexpected:
            print(f"  {nodeid}: {reason}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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

    from rlhf_online.engine.engine import Engine
    from rlhf_online.engine.interface import EngineConfig

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
    from support import sample, wait_for

    def wait(depth: int, timeout: float = 30.0) -> None:
        wait_for(lambda: sample("rlhf_generation_queue_depth") == depth, timeout, f"{depth} queued requests")

    return wait


@pytest.fixture(scope="session")
def encoder():
    """The reward model's sentence encoder, loaded once (it takes seconds)."""
    from rlhf_online.reward.encoder import TextEncoder

    return TextEncoder()
