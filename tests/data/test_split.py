"""The held-out split by prompt hash: stable, about the asked share, and the same for trainer and reward model."""

from __future__ import annotations

import pytest

from rlhf_online import config
from rlhf_online.data.split import HELDOUT_PERCENT, is_heldout
from rlhf_online.errors import ConfigError

PROMPTS = [f"Write a reply about topic {n}." for n in range(2000)]


def test_the_share_held_out_is_about_the_percent_and_grows_with_it():
    assert HELDOUT_PERCENT == 20  # the trainer's gate held out 20% before the setting reached it
    for percent in (0, 10, 20, 50):
        held = {p for p in PROMPTS if is_heldout(p, percent)}
        assert abs(len(held) / len(PROMPTS) - percent / 100) < 0.03, percent
        # a prompt held out at a share stays held out at every larger one
        assert held <= {p for p in PROMPTS if is_heldout(p, percent + 10)}


@pytest.mark.parametrize("prompt,bucket", [("How do I boil an egg?", 1), ("Write a reply about topic 0.", 18),
                                           ("hello", 14)])
def test_the_bucket_is_the_prompts_sha256_so_every_process_and_release_agrees(prompt, bucket):
    # Pinned: changing the rule would move prompts across the split of registries trained before.
    assert is_heldout(prompt, bucket + 1) and not is_heldout(prompt, bucket)


@pytest.mark.parametrize("cls", [config.RewardSettings, config.TrainerSettings])
def test_one_setting_reaches_both_services(cls, tmp_path):
    assert cls(data_dir=tmp_path).heldout_percent == HELDOUT_PERCENT
    assert config.build(cls, env={"RLHF_HELDOUT_PERCENT": "30", "RLHF_DATA_DIR": str(tmp_path)}).heldout_percent == 30
    with pytest.raises(ConfigError, match="heldout_percent"):
        cls(data_dir=tmp_path, heldout_percent=0)


def test_trainer_and_reward_model_hold_out_the_same_prompts(tmp_path):
    from rlhf_online.ppo.trainer import split_prompts
    from rlhf_online.reward.training import TrainConfig, build_dataset, prompt_key
    from rlhf_online.simulate.synthetic import fill_store
    from rlhf_online.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    fill_store(store)
    for percent in (20, 35):
        train, held = split_prompts(store, percent, window=10**6)
        data = build_dataset(store, TrainConfig(heldout_percent=percent))
        assert held and train
        assert set(held) == {prompt_key(c) for c in data.heldout.completions.values()}
        assert set(train) == {prompt_key(c) for c in data.train.completions.values()}
    store.close()
