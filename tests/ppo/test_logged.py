"""Rounds from the completion log on the tiny model: which completions are on-policy, the traffic gate, a round."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.data.split import is_heldout
from rlhf_online.ppo import logged, steps
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.policy import PolicyWithValue
from rlhf_online.ppo.trainer import Trainer
from rlhf_online.store import CompletionRecord, open_store

PPO = PPOConfig(batch_size=4, response_length=6, num_ppo_epochs=1, num_mini_batches=2, per_device_train_batch_size=4)
ON_POLICY = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 1, "stop": [], "max_new_tokens": 6, "n": 1}
PROMPTS = [f"Tell me something about topic {i}." for i in range(40)]


def served(cid: str, **overrides: object) -> CompletionRecord:
    fields: dict = {"completion_id": cid, "prompt": "Hi", "messages": (), "text": "hello", "policy_version": "",
                    "params": dict(ON_POLICY), "finish_reason": "eos", "prompt_token_ids": (1, 2, 3),
                    "token_ids": (4, 5, 2), "completion_tokens": 3}
    fields.update(overrides)
    return CompletionRecord(**fields)


@pytest.mark.parametrize(("overrides", "why"), [
    ({}, ""),
    ({"finish_reason": "length"}, ""),
    ({"token_ids": ()}, "no token ids logged"),
    ({"params": {**ON_POLICY, "temperature": 0.7}}, "temperature"),
    ({"params": {**ON_POLICY, "top_p": 0.9}}, "truncated sampling"),
    ({"params": {**ON_POLICY, "top_k": 50}}, "truncated sampling"),
    ({"params": {**ON_POLICY, "stop": ["\n"]}, "finish_reason": "eos"}, "stop strings"),
    ({"finish_reason": "stop"}, "stop strings"),
    ({"token_ids": tuple(range(200))}, "too long"),
])
def test_only_exact_samples_of_the_served_policy_are_on_policy(overrides, why):
    assert logged.why_not_on_policy(served("c", **overrides), PPO, TrainerConfig()) == why


def test_no_user_fills_more_than_its_share_of_a_batch(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        train_prompts = [p for p in PROMPTS if not is_heldout(p, 20)]
        flood = [served(f"flood-{k}", prompt=train_prompts[k % len(train_prompts)], user_id="mallory", tenant="t",
                        created_at=2000.0 + k) for k in range(40)]  # the newest: read first
        honest = [served(f"h-{u}-{k}", prompt=train_prompts[k], user_id=f"user{u}", tenant="t",
                         created_at=1000.0 + 10 * u + k) for u in range(4) for k in range(5)]
        anonymous = [served(f"anon-{k}", prompt=train_prompts[k], created_at=500.0 + k) for k in range(6)]
        store.add_completions(flood + honest + anonymous)
        cfg = TrainerConfig(logged_batch_size=16, logged_max_user_share=0.25)
        batch = logged.read(store, "", PPO, cfg, heldout_percent=20)
    ids = [s.completion_id for s in batch.train]
    assert sum(i.startswith("flood-") for i in ids) == 4  # ceil(0.25 * 16): the rest of the flood is left out
    assert sum(i.startswith("h-") for i in ids) == 12  # four honest users of the same tenant fill the batch
    assert batch.left_out["user share"] >= 36
    # Without keys there is no identity to cap by: unkeyed completions each count as their own, user_id or not.
    with open_store(f"sqlite:///{tmp_path / 'anon.db'}") as store:
        store.add_completions(anonymous + [served(f"claimed-{k}", prompt=train_prompts[k], user_id="bob",
                                                  created_at=600.0 + k) for k in range(4)])
        batch = logged.read(store, "", PPO, TrainerConfig(logged_batch_size=8, logged_max_user_share=0.25), 20)
    assert len(batch.train) == 8 and sum(s.completion_id.startswith("claimed-") for s in batch.train) == 4


def test_the_traffic_gate_is_exact_for_an_unchanged_policy_and_follows_the_weights():
    lp = torch.log(torch.full((4, 3), 0.5))
    ref = lp - 0.1
    scores = torch.tensor([1.0, 0.0, 0.0, -1.0])
    same = logged.judge_on_traffic(lp, lp, ref, scores)
    assert same.reward_candidate == pytest.approx(same.reward_current) == pytest.approx(0.0)
    # k3 per token with log(p/ref) = 0.1: e^-0.1 - 1 + 0.1, three tokens
    assert same.ess_share == pytest.approx(1.0) and same.kl_candidate == pytest.approx(3 * (math.exp(-0.1) - 0.9), rel=1e-5)
    # never negative, even where the sampled tokens are likelier under the reference (k1 would say -0.3)
    assert logged.judge_on_traffic(ref, ref, lp, scores).kl_candidate > 0
    # A candidate that makes the best reply 4x as likely (per token: x 4^(1/3)) and the worst 4x less
    moved = lp.clone()
    moved[0] += torch.log(torch.tensor(4.0)) / 3
    moved[3] -= torch.log(torch.tensor(4.0)) / 3
    v = logged.judge_on_traffic(lp, moved, ref, scores)
    # weights 4, 1, 1, 1/4 -> (4 - 1/4) / 6.25 = 0.6
    assert v.reward_candidate == pytest.approx(0.6) and v.ess_share < 1.0 and v.diff_se > 0


def test_the_traffic_gate_gives_the_candidates_kl_a_standard_error_that_shrinks_with_the_replies():
    g = torch.Generator().manual_seed(0)

    def verdict(n: int) -> logged.TrafficVerdict:
        lp = torch.log(torch.full((n, 4), 0.5))
        ref = lp - torch.rand(n, 1, generator=g)  # each reply's own KL to the reference
        return logged.judge_on_traffic(lp, lp, ref, torch.randn(n, generator=g), boot=400)

    small, large = verdict(100), verdict(1600)
    # an unchanged policy weighs every reply alike: the bootstrap SE of a plain mean, sd / sqrt(n)
    u = torch.rand(100_000, generator=g)  # log p - log ref of a reply, the same at its four tokens
    per_reply_sd = float((4 * (torch.exp(-u) - 1 + u)).std())  # sd of its k3 sequence KL
    assert small.kl_se > 0 and large.kl_se > 0
    assert large.kl_se == pytest.approx(small.kl_se / 4, rel=0.3)  # 16 times the replies: a quarter of the error
    assert small.kl_se == pytest.approx(per_reply_sd / 10, rel=0.3)
    # A candidate that moved: the bootstrap follows the weights, as the delta method's sqrt(sum w^2 (kl - mean)^2) does
    n = 400
    lp = torch.log(torch.full((n, 4), 0.5))
    ref = lp - torch.rand(n, 1, generator=g)
    moved = lp + 0.3 * torch.randn(n, 1, generator=g)
    v = logged.judge_on_traffic(lp, moved, ref, torch.randn(n, generator=g), boot=400)
    w = torch.softmax((moved - lp).sum(1).double(), 0)
    seq_kl = steps.core.kl_per_token(moved, ref, "k3").sum(1).double()
    delta = float(((w ** 2) * (seq_kl - (w * seq_kl).sum()) ** 2).sum().sqrt())
    assert v.ess_share < 0.9 and v.kl_se == pytest.approx(delta, rel=0.3)


@pytest.fixture
def traffic(tiny, tmp_path):
    """A store with replies the tiny base policy sampled for 40 prompts, logged as the bare base ("") served them."""
    model, tok = tiny
    policy = PolicyWithValue(copy.deepcopy(model), PPO)
    samples = steps.sample(policy, tok, PROMPTS, PPO, seed=0)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.add_completions([served(f"c{i}", prompt=s.prompt, text=s.text, prompt_token_ids=s.prompt_ids,
                                  token_ids=s.response_ids, finish_reason="eos" if s.ended else "length",
                                  created_at=1000.0 + i) for i, s in enumerate(samples)])
    yield store
    store.close()


def make_trainer(tiny, store, tmp_path, calls, **knobs):
    def reward(prompts, texts, completion_ids):
        calls.append(list(completion_ids))
        return [len(t) / 100 for t in texts]

    return Trainer(TrainerConfig(round_interval_seconds=0, round_min_feedback=0, eval_prompts=2,
                                 eval_samples_per_prompt=1, **knobs), PPO, store, AdapterRegistry(tmp_path / "adapters"),
                   reward, lambda: (copy.deepcopy(tiny[0]), tiny[1]), base_model="tiny")


def test_a_round_trains_on_the_logged_traffic_and_judges_on_held_out_traffic(tiny, traffic, tmp_path):
    calls: list[list[str]] = []
    trainer = make_trainer(tiny, traffic, tmp_path, calls, min_logged_samples=8, round_min_traffic=8,
                           gate_min_samples=2, gate_min_ess=0.01)
    train_id = next(f"c{i}" for i, p in enumerate(PROMPTS) if not is_heldout(p, trainer.heldout_percent))
    traffic.add_feedback(train_id, "u", "thumbs_up")
    assert trainer.due(last_round_at=0.0, now=0.0)  # 40 logged replies of the served version, none used yet
    r = trainer.run_round()
    held = {f"c{i}" for i, p in enumerate(PROMPTS) if is_heldout(p, trainer.heldout_percent)}
    assert 2 <= len(held) < 40, "the fixture needs prompts on both sides"
    assert r.metrics["samples/logged"] == 40 - len(held) and r.metrics["samples/own"] == 0, r
    assert r.metrics["eval/on_traffic"] == 1.0 and r.metrics["samples/rated"] == 1, r
    # the reward was asked about exactly the logged completions, by id: training rows, then the held-out ones
    assert set(calls[0]) == {f"c{i}" for i in range(40)} - held and set(calls[1]) == held
    assert r.outcome in ("published", "rejected") and "importance-weighted" in r.reason, r
    assert not trainer.due(last_round_at=1e12, now=1e12)  # nothing new was served since the round started


def test_thin_traffic_is_topped_up_with_own_rollouts_and_judged_by_sampling(tiny, traffic, tmp_path):
    calls: list[list[str]] = []
    trainer = make_trainer(tiny, traffic, tmp_path, calls, min_logged_samples=100, gate_min_samples=100)
    r = trainer.run_round()
    assert r.metrics["samples/own"] == PPO.batch_size and r.metrics["samples/logged"] > 0, r
    assert r.metrics["eval/on_traffic"] == 0.0 and "paired diff" in r.reason, r
    assert calls[0].count("") == PPO.batch_size  # own rollouts carry no completion id


def test_with_learning_from_traffic_off_a_round_uses_own_rollouts_only(tiny, traffic, tmp_path):
    calls: list[list[str]] = []
    trainer = make_trainer(tiny, traffic, tmp_path, calls, learn_from_traffic=False, min_logged_samples=1)
    r = trainer.run_round()
    assert r.metrics["samples/logged"] == 0 and r.metrics["samples/own"] == PPO.batch_size, r
    assert not trainer.due(last_round_at=1e12, now=1e12)


def test_a_round_of_three_updates_trains_on_the_traffic_then_on_fresh_rollouts_and_gates_once(tiny, traffic, tmp_path):
    calls: list[list[str]] = []
    trainer = make_trainer(tiny, traffic, tmp_path, calls, min_logged_samples=8, gate_min_samples=100,
                           updates_per_round=3, round_kl_stop=1.0)
    r = trainer.run_round()
    assert r.metrics["trainer/updates"] == 3 and r.metrics["samples/own"] == 2 * PPO.batch_size, r
    logged_rows = int(r.metrics["samples/logged"])
    assert logged_rows > 0 and "" not in calls[0] and len(calls[0]) == logged_rows  # update 1: the traffic
    assert calls[1] == calls[2] == [""] * PPO.batch_size  # updates 2 and 3: rollouts of the policy being trained
    assert len(calls) == 3 + 2  # then one gate: the served version's replies, the candidate's
    assert r.outcome in ("published", "rejected") and len(trainer.registry.versions()) == (r.outcome == "published")


def test_the_gate_reads_the_served_weights_back_and_leaves_the_candidate_as_it_was(tiny):
    model, tok = tiny
    policy = PolicyWithValue(copy.deepcopy(model), PPO)
    rollouts = steps.collect(policy, tok, PROMPTS[:3], PPO, seed=0)
    served = policy.trainable_state()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    candidate = steps.response_logprobs(policy, rollouts, PPO)
    assert not torch.allclose(candidate, rollouts.logprobs, atol=1e-4)  # the perturbation changed the policy
    with policy.using(served):
        assert torch.allclose(steps.response_logprobs(policy, rollouts, PPO), rollouts.logprobs, atol=1e-5)
    assert torch.equal(steps.response_logprobs(policy, rollouts, PPO), candidate)


@pytest.mark.parametrize(("measured", "updates", "stopped"), [
    ([1.0, 9.5], 1, 1.0),  # the policy after update 1 is past 0.75 of the budget of 12: the round stops there
    ([1.0, 8.9, 8.99], 3, 0.0),  # under 9 nats each time: all three updates
])
def test_a_round_makes_no_further_update_once_its_rollouts_pass_the_kl_stop(tiny, traffic, tmp_path, monkeypatch,
                                                                              measured, updates, stopped):
    kls = iter(measured)  # each update's measured batch, in turn: the logged traffic, then fresh rollouts
    monkeypatch.setattr(steps, "sequence_kl", lambda rollouts: next(kls))
    calls: list[list[str]] = []
    trainer = make_trainer(tiny, traffic, tmp_path, calls, min_logged_samples=8, gate_min_samples=100,
                           updates_per_round=3, kl_budget=12.0, round_kl_stop=0.75)
    r = trainer.run_round()
    assert r.metrics["trainer/updates"] == updates and r.metrics["trainer/kl_stopped"] == stopped, r
    assert r.metrics["samples/own"] == (updates - 1) * PPO.batch_size, r
    assert len(calls) == updates + 2, calls  # the reward scored only the batches trained on, then the gate's two
    assert next(kls, None) is None  # every update measured once, the stopped one included


def test_sequence_kl_sums_each_responses_tokens_and_averages_the_responses():
    rollouts = steps.Rollouts(["p", "p"], torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 3, dtype=torch.long),
                              torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), ["a", "b"], torch.tensor([True, True]),
                              torch.full((2, 3), -1.0), torch.full((2, 3), -1.5), torch.zeros(2, 3), ["", ""])
    k3 = math.exp(-0.5) - 1 + 0.5  # per token, with log(p / ref) = 0.5
    assert steps.sequence_kl(rollouts) == pytest.approx((2 * k3 + 3 * k3) / 2)  # padding after the first reply's EOS


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_candidates_past_the_kl_stop_line_raise_the_next_rounds_beta_and_ones_under_it_ease_it(
        tiny, traffic, tmp_path, monkeypatch, rate):
    calls: list[list[str]] = []
    knobs = {"learn_from_traffic": False, "min_logged_samples": 1, "kl_budget": 12.0, "round_kl_stop": 0.75,
             "kl_pressure_rate": rate}
    trainer = make_trainer(tiny, traffic, tmp_path, calls, **knobs)
    gated = iter([(True, 18.0), (False, 4.5), (False, 4.5)])  # each round's verdict and candidate KL; stop line 9

    def gate(policy, served_weights, current):
        passed, kl = next(gated)
        return passed, "as scripted", {"eval/kl": kl}

    monkeypatch.setattr(trainer, "_gate", gate)
    # the factor each round trains with: 1; e (18 is 1 past the stop, the largest step); e^0.5 (4.5: eased by half)
    expected = [1.0, math.e, math.exp(0.5)] if rate else [1.0, 1.0, 1.0]
    for factor in expected:
        beta = trainer.kl_ctl.value  # the adaptive controller's own, as the round's one update starts
        r = trainer.run_round()
        assert r.metrics["objective/kl_coef"] == pytest.approx(beta * factor), r
    assert trainer.kl_pressure.value == pytest.approx(1.0)  # 4.5 again: back to the controller's beta, never under
    # A restarted trainer resumes from the head's manifest (v000001, published after the first round), not from 1.
    assert trainer.registry.versions() == ["v000001"]
    resumed = make_trainer(tiny, traffic, tmp_path, calls, **knobs)
    assert resumed.kl_pressure.value == pytest.approx(math.e if rate else 1.0)
