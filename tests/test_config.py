"""Settings from env and flags: precedence, types, and errors that name the setting."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_online import config
from rlhf_online.config import GenerationSettings, RewardSettings, TrainerSettings
from rlhf_online.errors import ConfigError
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.reward.runtime import RewardConfig, RewardRuntime


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
                                      ({"RLHF_EVAL_PROMPTS": "0"}, "eval_prompts")])
def test_a_bad_nested_value_names_its_flag_and_variable(env, name):
    with pytest.raises(ConfigError, match=f"{name}: invalid value .*; set --{name.replace('_', '-')} or RLHF_"):
        config.build(TrainerSettings, None, env=env)


def test_the_reward_runtime_config_is_built_from_the_settings():
    cfg = config.project(RewardConfig, RewardSettings(data_dir=Path("/tmp/x"), encoder_layer=2))
    assert (cfg.encoder_layer, cfg.reward_dir, cfg.reward_model) == (2, Path("/tmp/x/reward_models"), "learned")
    with pytest.raises(ConfigError, match="reward_classifier"):  # checked where the rewards are built
        RewardRuntime(dataclasses.replace(cfg, reward_model="classifier"), store=None)
