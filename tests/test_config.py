"""Settings from env and flags: precedence, types, and errors that name the setting."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from support import make_pki

from rlhf_online import config
from rlhf_online.config import GenerationSettings, RewardSettings, TrainerSettings
from rlhf_online.errors import ConfigError
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.reward.runtime import RewardConfig, RewardRuntime
from rlhf_online.tls import ClientTLS


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
    (("--max-batch-tokens", "2000"), {}, "max_batch_tokens"),  # below max_prompt_tokens + max_new_tokens
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


# ------------------------------------------------------------------ nested configs (PPO and round knobs)

TRAINER_KNOBS = {"round_interval_seconds", "round_min_feedback", "min_prompts", "batch_size", "response_length",
                 "num_ppo_epochs", "learning_rate", "init_kl_coef", "adaptive_kl", "target_kl", "kl_budget",
                 "eval_prompts", "eval_samples_per_prompt", "eval_seed", "keep_versions"}


def test_trainer_knobs_are_flat_settings_of_the_nested_configs():
    names = [s.name for s in config.settings_of(TrainerSettings)]
    assert len(names) == len(set(names)) and set(names) >= TRAINER_KNOBS
    p = argparse.ArgumentParser()
    config.add_arguments(p, TrainerSettings)
    s = config.build(TrainerSettings, p.parse_args(["--batch-size", "3", "--kl-budget", "2.5"]),
                     env={"RLHF_TARGET_KL": "4", "RLHF_ADAPTIVE_KL": "false", "RLHF_BATCH_SIZE": "5"})
    assert (s.ppo.batch_size, s.ppo.target_kl, s.ppo.adaptive_kl, s.trainer.kl_budget) == (3, 4.0, False, 2.5)
    assert s.ppo.response_length == PPOConfig().response_length and s.trainer.eval_seed == TrainerConfig().eval_seed
    assert config.assemble(TrainerSettings, config.flatten(s)) == s


@pytest.mark.parametrize("env,name", [({"RLHF_BATCH_SIZE": "0"}, "batch_size"),
                                      ({"RLHF_LEARNING_RATE": "-1"}, "learning_rate"),
                                      ({"RLHF_EVAL_PROMPTS": "0"}, "eval_prompts"),
                                      ({"RLHF_ROUND_KL_STOP": "0"}, "round_kl_stop"),
                                      ({"RLHF_KL_PRESSURE_RATE": "-1"}, "kl_pressure_rate")])
def test_a_bad_nested_value_names_its_flag_and_variable(env, name):
    with pytest.raises(ConfigError, match=f"{name}: invalid value .*; set --{name.replace('_', '-')} or RLHF_"):
        config.build(TrainerSettings, None, env=env)


def test_the_reward_runtime_config_is_built_from_the_settings():
    cfg = config.project(RewardConfig, RewardSettings(data_dir=Path("/tmp/x"), encoder_layer=2))
    assert (cfg.encoder_layer, cfg.reward_dir, cfg.reward_model) == (2, Path("/tmp/x/reward_models"), "learned")
    with pytest.raises(ConfigError, match="reward_classifier"):  # checked where the rewards are built
        RewardRuntime(dataclasses.replace(cfg, reward_model="classifier"), store=None)


# ------------------------------------------------------------------ TLS files

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server and a client certificate, another CA's, a non-PEM file, an encrypted key."""
    root = tmp_path_factory.mktemp("pki")
    files = {"pki": make_pki(root), "other": make_pki(root, "other"), "dir": root}
    (root / "notes.txt").write_text("TOP-SECRET-CONTENTS do not print me\n")
    files["text"] = root / "notes.txt"
    files["encrypted"] = root / "encrypted.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-aes256", "-pass", "pass:x", "-out", str(files["encrypted"])], check=True, capture_output=True)
    return files


def tls_cases(pki):
    p, other = pki["pki"], pki["other"]
    return {  # id: (settings class, values, the setting the error must name, text the message must hold)
        "missing CA": (TrainerSettings, {"tls_ca": pki["dir"] / "nope.pem"}, "tls_ca", "not an existing file"),
        "CA is a directory": (TrainerSettings, {"reward_tls_ca": pki["dir"]}, "reward_tls_ca", "not an existing file"),
        "CA is no PEM": (GenerationSettings, {"tls_ca": pki["text"]}, "tls_ca", "no PEM CA bundle"),
        "CA is a key": (TrainerSettings, {"tls_ca": p.client_key}, "tls_ca", "no PEM CA bundle"),
        "cert without key": (RewardSettings, {"tls_cert": p.server_cert}, "tls_cert/tls_key", "set both or neither"),
        "key of another cert": (RewardSettings, {"tls_cert": p.server_cert, "tls_key": other.server_key}, "tls_key",
                                "is not the key of tls_cert"),
        "cert is a key": (RewardSettings, {"tls_cert": p.server_key, "tls_key": p.server_key}, "tls_cert",
                          "no PEM certificate"),
        "encrypted key": (RewardSettings, {"tls_cert": p.server_cert, "tls_key": pki["encrypted"]}, "tls_key",
                          "encrypted"),
        "client CA without TLS": (RewardSettings, {"tls_client_ca": p.ca}, "tls_client_ca", "--tls-cert"),
        "client CA is no PEM": (RewardSettings, {"tls_cert": p.server_cert, "tls_key": p.server_key,
                                                 "tls_client_ca": pki["text"]}, "tls_client_ca", "no PEM"),
        "client cert without key": (TrainerSettings, {"tls_ca": p.ca, "tls_client_cert": p.client_cert},
                                    "tls_client_cert/tls_client_key", "set both or neither"),
        "client key of another cert": (TrainerSettings, {"tls_ca": p.ca, "tls_client_cert": p.client_cert,
                                                         "tls_client_key": other.client_key}, "tls_client_key",
                                       "is not the key of tls_client_cert"),
        "client cert without a CA": (TrainerSettings, {"tls_client_cert": p.client_cert,
                                                       "tls_client_key": p.client_key}, "tls_client_cert",
                                     "--reward-tls-ca, --tls-ca"),
        "client cert on plaintext calls": (GenerationSettings, {"tls_client_cert": p.client_cert,
                                                                "tls_client_key": p.client_key}, "tls_client_cert",
                                           "--tls-ca"),
    }


CASE_IDS = ["missing CA", "CA is a directory", "CA is no PEM", "CA is a key", "cert without key", "key of another cert",
            "cert is a key", "encrypted key", "client CA without TLS", "client CA is no PEM", "client cert without key",
            "client key of another cert", "client cert without a CA", "client cert on plaintext calls"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_tls_files_are_refused_by_name_without_their_contents(pki, case):
    cls, values, name, why = tls_cases(pki)[case]
    env = {f"RLHF_{k.upper()}": str(v) for k, v in values.items()}  # as Kubernetes sets them
    with pytest.raises(ConfigError) as e:
        config.build(cls, None, env=env)
    message = str(e.value)
    assert message.startswith(f"{name}:") and why in message, message
    assert "; set --" in message and " or RLHF_" in message  # says which flag or variable to set
    shown = [pki["text"], pki["encrypted"], *(getattr(pki["pki"], f.name) for f in dataclasses.fields(pki["pki"]))]
    for path in shown:  # no line of any file involved, PEM body or not, is quoted
        body = [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
        assert not any(line in message for line in body), (path, message)


def test_tls_settings_from_flags_and_env(pki):
    p, other = pki["pki"], pki["other"]
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, TrainerSettings)
    args = parser.parse_args(["--reward-tls-ca", str(p.ca), "--tls-client-cert", str(p.client_cert),
                              "--tls-client-key", str(p.client_key), "--health-port", "0"])
    s = config.build(TrainerSettings, args, env={"RLHF_TLS_CA": str(other.ca)})
    # The reward's own CA wins over the shared one; the client certificate goes with it (mutual TLS).
    assert s.reward_tls == ClientTLS(p.ca, p.client_cert, p.client_key) and s.health_port == 0
    shared = config.build(TrainerSettings, None, env={"RLHF_TLS_CA": str(other.ca)})
    assert shared.reward_tls == ClientTLS(other.ca)
    assert config.build(TrainerSettings, None, env={}).reward_tls is None  # plaintext unless a CA is set
    server = config.build(RewardSettings, None, env={"RLHF_TLS_CERT": str(p.server_cert),
                                                     "RLHF_TLS_KEY": str(p.server_key),
                                                     "RLHF_TLS_CLIENT_CA": str(p.ca), "RLHF_HEALTH_PORT": "50062"})
    assert (server.tls_client_ca, server.health_port) == (p.ca, 50062)
    with pytest.raises(ConfigError, match="health_port: invalid value -2"):
        config.build(RewardSettings, None, env={"RLHF_HEALTH_PORT": "-2"})
