"""Settings from env and flags: precedence, types, and errors that name the setting."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_online import config
from rlhf_online.config import GenerationSettings
from rlhf_online.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_arguments(p, GenerationSettings)
    return p.parse_args(argv)


def test_defaults_follow_the_design():
    s = config.build(GenerationSettings, parse(), env={})
    assert (s.port, s.http_port, s.base_model) == (50051, -1, "smollm2-135m-instruct")
    assert s.store_url.startswith("sqlite:///") and s.store_url.endswith("data/rlhf.db")
    assert s.adapter_dir == Path("data") / "adapters"


def test_flag_beats_env_and_env_beats_default():
    env = {"RLHF_PORT": "6000", "RLHF_MAX_BATCH_SIZE": "4", "RLHF_DATA_DIR": "/tmp/x"}
    s = config.build(GenerationSettings, parse("--port", "7000"), env=env)
    assert (s.port, s.max_batch_size, s.data_dir) == (7000, 4, Path("/tmp/x"))
    assert s.adapter_dir == Path("/tmp/x/adapters")


@pytest.mark.parametrize("argv,env,name", [
    (("--port", "70000"), {}, "port"),
    (("--port", "abc"), {}, "port"),
    ((), {"RLHF_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ((), {"RLHF_STORE_URL": "mysql://x"}, "store_url"),
    (("--max-n", "0"), {}, "max_n"),
    (("--tls-cert", "/no/such.pem"), {}, "tls_cert"),
    (("--log-level", "LOUD"), {}, "log_level"),
])
def test_bad_values_are_refused_by_name(argv, env, name):
    with pytest.raises(ConfigError, match=name):
        config.build(GenerationSettings, parse(*argv), env=env)


def test_serve_with_a_bad_value_exits_2_naming_it():
    r = subprocess.run([sys.executable, "-m", "services.cli", "serve", "generation", "--max-batch-size", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "max_batch_size" in r.stderr and "--max-batch-size" in r.stderr
