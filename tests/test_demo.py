"""The whole loop, short: tiny model, three real service processes, simulated users for under a minute."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3

import pytest

from rlhf_online import config, demo
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.config import TrainerSettings
from rlhf_online.errors import ConfigError


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_feedback_flows_a_round_publishes_and_the_new_version_is_served(tiny_model_dir, tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    # Half a minute of users, then on until a published version's reply was rated (an event, not a time
    # window: a loaded machine takes longer to train a reward model and run a round, up to 8 more minutes).
    args = parser.parse_args([
        "--base-model", str(tiny_model_dir), "--runs-dir", str(tmp_path), "--minutes", "0.5",
        "--until-served-minutes", "8", "--users", "3",
        "--max-new-tokens", "8", "--heldout-prompts", "6", "--heldout-samples", "1", "--serving-threads", "1",
        "--training-threads", "1", "--reward-threads", "1", "--eval-prompts", "4", "--batch-size", "4",
        "--num-ppo-epochs", "2", "--reward-retrain-min-feedback", "8", "--kl-budget", "1000",
        "--learn-from-traffic", "true", "--round-interval-seconds", "60", "--min-logged-samples", "8",
        "--round-min-traffic", "8", "--logged-batch-size", "32", "--updates-per-round", "1", "--canary-min-rounds", "1"])
    assert demo.main(args) == 0
    [run] = list(tmp_path.iterdir())
    report = json.loads((run / "report.json").read_text())

    # Feedback flowed: the users' ratings and preferences are all in the store the services shared.
    db = sqlite3.connect(run / "state" / "rlhf.db")
    assert db.execute("select count(*) from feedback").fetchone()[0] == report["ratings"] > 20
    assert db.execute("select count(*) from preferences").fetchone()[0] == report["preferences"] > 0
    assert report["failed_requests"] == 0

    # The reward service trained on it, a round ran and published, and users were served the new version: as a
    # canary (on by default), to the users in its share, whose ratings then decide whether it becomes CURRENT.
    assert report["reward_model"].startswith("r")
    assert report["rounds_published"] >= 1
    served = [json.loads(line)["policy_version"] for line in (run / "ratings.jsonl").read_text().splitlines()]
    assert any(v.startswith("v") for v in served) and served[0] == ""
    first = report["canaries"][0]
    assert first["version"] == "v000001" and first["share_percent"] == 100 and first["live_minute"] is not None
    assert report["final_version"] in ("", *(c["version"] for c in report["canaries"] if c["outcome"] == "promoted"))
    assert "## Canaries" in (run / "report.md").read_text() and report["promoted_but_worse"] == []

    # Rounds learned from the users' traffic: a published version trained on logged replies of the version
    # it started from, rewarded (through the Reward service) by the ratings users gave those very replies.
    published = [m["metrics"] for m in AdapterRegistry(run / "state" / "adapters").describe()]
    assert any(m["samples/logged"] > 0 and m["samples/rated"] > 0 for m in published), published

    # The report: the contract's keys, the markdown and a PNG.
    for side in ("base", "final"):
        assert set(report[side]) == {"toxicity", "sentiment", "thumbs_up_rate"}
    assert report["rounds"] >= 1 and report["loop_seconds"] >= 30 and report["kl"] >= 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG" and "Held-out" in (run / "report.md").read_text()

    # Learning per version: every reply served is in one row, the base's first, published versions beside it.
    rows = report["versions"]
    assert rows[0]["version"] == "" and any(r["version"].startswith("v") for r in rows)
    assert sum(r["replies"] for r in rows) == report["completions"] and sum(r["ratings"] for r in rows) == report["ratings"]
    assert all(0 <= r["noise_free_ci95"][0] <= r["noise_free_rate"] <= r["noise_free_ci95"][1] <= 1 for r in rows)
    assert "Learning per policy version" in (run / "report.md").read_text()


def test_the_demo_hands_its_ppo_and_round_knobs_to_the_trainer_unchanged(tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--batch-size", "4", "--max-new-tokens", "8", "--learning-rate", "0.01",
                              "--kl-budget", "3", "--eval-prompts", "5", "--round-kl-stop", "0.5",
                              "--kl-pressure-rate", "0.25"])
    cfg = config.assemble(demo.DemoConfig, vars(args))
    env = demo.service_envs(cfg, tmp_path / "model", tmp_path, reward_port=1234)["trainer"]
    trainer = config.build(TrainerSettings, None, env)
    assert trainer.ppo == dataclasses.replace(cfg.ppo, response_length=8)
    assert (trainer.ppo.batch_size, trainer.ppo.learning_rate, trainer.ppo.init_kl_coef) == (4, 0.01, 0.02)
    assert trainer.trainer == cfg.trainer and (trainer.trainer.kl_budget, trainer.trainer.eval_prompts) == (3.0, 5)
    assert trainer.trainer.round_kl_stop == 0.5 and trainer.trainer.kl_pressure_rate == 0.25
    assert trainer.trainer.round_interval_seconds == 1.0 and trainer.trainer.round_min_feedback == 0
    assert not trainer.trainer.learn_from_traffic and trainer.ppo.num_mini_batches == 1
    # Candidates of 3 updates a round, live once 2 rounds past CURRENT, judged by every user's interleaved pairs.
    assert trainer.trainer.updates_per_round == 3 and trainer.canary_controller == cfg.canary
    assert cfg.canary.canary_min_rounds == 2
    assert demo.service_envs(cfg, tmp_path / "model", tmp_path, 1234)["generation"]["RLHF_CANARY_PERCENT"] == "100.0"
    traffic = demo.service_envs(config.assemble(demo.DemoConfig, vars(parser.parse_args(
        ["--learn-from-traffic", "true", "--num-mini-batches", "4"]))), tmp_path / "model", tmp_path, 1234)["trainer"]
    on = config.build(TrainerSettings, None, traffic)
    assert on.trainer.learn_from_traffic and on.ppo.num_mini_batches == 4


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_a_rated_fraction_outside_0_to_1_names_the_flag(value):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(ConfigError, match="rated_fraction.*--rated-fraction"):
        config.assemble(demo.DemoConfig, vars(parser.parse_args(["--rated-fraction", value])))


def test_the_rated_fraction_flag_defaults_to_rating_everything():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert config.assemble(demo.DemoConfig, vars(parser.parse_args([]))).rated_fraction == 1.0
    assert config.assemble(demo.DemoConfig, vars(parser.parse_args(["--rated-fraction", "0.3"]))).rated_fraction == 0.3


@pytest.mark.parametrize("value", ["1", "9", "-4"])
def test_a_rank_n_other_than_0_or_2_to_8_names_the_flag(value):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(ConfigError, match="rank_n.*--rank-n"):
        config.assemble(demo.DemoConfig, vars(parser.parse_args(["--rank-n", value])))


def test_the_rank_n_flag_reaches_the_simulated_users():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.user_pool_config(config.assemble(demo.DemoConfig, vars(parser.parse_args([])))).rank_n == 0
    users = demo.user_pool_config(config.assemble(demo.DemoConfig, vars(parser.parse_args(
        ["--rank-n", "4", "--rated-fraction", "0.5", "--users", "3"]))))
    assert (users.rank_n, users.rated_fraction, users.users, users.pair_fraction) == (4, 0.5, 3, 1.0)


def test_the_bare_bases_heldout_replies_are_generated_once_and_reused(tmp_path, monkeypatch):
    from rlhf_online.report import heldout

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    calls = []

    def fake_generate(model_path, adapters, prompts, cfg):
        calls.append(sorted(adapters))
        return {label: [f"{label} reply {i}" for i in range(len(prompts) * cfg.samples)] for label in adapters}

    monkeypatch.setattr(heldout, "generate", fake_generate)
    cfg, prompts, final = heldout.HeldoutConfig(samples=2), ["a?", "b?"], tmp_path / "v000003"
    first = demo._heldout_replies(model, final, prompts, cfg, tmp_path / "data")
    second = demo._heldout_replies(model, final, prompts, cfg, tmp_path / "data")
    assert calls == [["base", "final"], ["final"]] and first == second and len(first["base"]) == 4
    assert demo._heldout_replies(model, None, prompts, cfg, tmp_path / "data")["final"] == first["base"]
    assert len(calls) == 2  # a final policy that is the bare base needs no generation at all
    demo._heldout_replies(model, final, prompts, heldout.HeldoutConfig(samples=3), tmp_path / "data")
    (model / "model.safetensors").write_bytes(b"other weights")  # another model: its own replies
    demo._heldout_replies(model, final, prompts, cfg, tmp_path / "data")
    assert calls[2:] == [["base", "final"], ["base", "final"]]
    (model / "model.safetensors").write_bytes(b"a third model")  # and nothing promoted: the base once, not twice
    bare = demo._heldout_replies(model, None, prompts, cfg, tmp_path / "data")
    assert calls[4:] == [["base"]] and bare["final"] == bare["base"] == [f"base reply {i}" for i in range(4)]


def test_past_its_minutes_the_demo_waits_only_for_what_it_was_told_to_and_only_so_long():
    plain = demo.DemoConfig(minutes=10)
    assert demo.users_go_on(plain, 9.9, served=False, promoted=False)
    assert not demo.users_go_on(plain, 10.0, served=False, promoted=False)  # 0 = stop at --minutes
    until = demo.DemoConfig(minutes=10, until_promoted_minutes=5)
    assert demo.users_go_on(until, 12.0, served=True, promoted=False)  # a canary is served, none promoted yet
    assert not demo.users_go_on(until, 12.0, served=True, promoted=True)
    assert not demo.users_go_on(until, 15.0, served=True, promoted=False)  # at most 5 more minutes
    served = demo.DemoConfig(minutes=10, until_served_minutes=3)
    assert demo.users_go_on(served, 11.0, served=False, promoted=False)
    assert not demo.users_go_on(served, 11.0, served=True, promoted=False)
    both = demo.DemoConfig(minutes=10, until_served_minutes=3, until_promoted_minutes=10)
    assert demo.users_go_on(both, 11.0, served=True, promoted=False)  # each wait holds until its own event
    assert not demo.users_go_on(both, 11.0, served=True, promoted=True)
    with pytest.raises(ConfigError, match="until_promoted_minutes.*--until-promoted-minutes"):
        demo.DemoConfig(until_promoted_minutes=-1)


def test_the_report_says_when_users_ran_past_the_minutes_asked_for():
    from rlhf_online.report.write import _users_minutes

    promoted = demo.users_go_on(demo.DemoConfig(minutes=10, until_promoted_minutes=10), 10.0, served=True,
                                promoted=False)  # what the loop records once the minutes are up
    assert promoted == ["their ratings promoted a version, for at most 10 more minutes"]
    assert _users_minutes({"minutes": 10, "users_minutes": 10.05, "users_waited_for": []}) == "10 minutes"
    assert _users_minutes({"minutes": 10}) == "10 minutes"  # reports written before users_minutes was recorded
    assert _users_minutes({"minutes": 10, "users_minutes": 13.42, "users_waited_for": promoted}) == \
        "13.4 minutes (10 asked for, then until their ratings promoted a version, for at most 10 more minutes)"
    # no wait: a late last poll is not a wait
    assert _users_minutes({"minutes": 10, "users_minutes": 10.9, "users_waited_for": []}) == "10 minutes"
