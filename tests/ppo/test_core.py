"""PPO math on hand-made tensors: GAE by hand, KL estimators, rewards, clipping, whitening, the KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_online.errors import ConfigError
from rlhf_online.ppo import core
from rlhf_online.ppo.config import PPOConfig


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is padding: ignored
    gamma, lam = 0.9, 0.8
    # by hand, backwards: delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}
    d2 = 1.0 + 0.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])


def test_gae_with_gamma_1_and_lambda_1_is_return_minus_value():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = core.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([0.6 - 1.0, 0.5 - 2.0, 0.3 - 3.0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_their_gradient_are_log_softmax_gathers(temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 4).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64)  # a loss that weighs each token differently
    ours = core.logprobs_of(logits, tokens, temperature)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert ours.dtype == torch.float32  # the logits are read in fp32, as before
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)


def test_kl_estimators():
    p = torch.log(torch.tensor([0.5, 0.2]))
    q = torch.log(torch.tensor([0.25, 0.4]))
    k1 = core.kl_per_token(p, q, "k1")
    k3 = core.kl_per_token(p, q, "k3")
    assert k1.tolist() == pytest.approx([math.log(2), math.log(0.5)])
    r = torch.tensor([0.5, 2.0])  # q / p
    assert k3.tolist() == pytest.approx(((r - 1) - torch.log(r)).tolist())
    assert (k3 >= 0).all() and core.kl_per_token(p, p, "k3").abs().max() < 1e-7
    # Both estimate KL(p || q) without bias: check on samples from p.
    probs_p, probs_q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((probs_p * (probs_p / probs_q).log()).sum())
    x = torch.multinomial(probs_p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = probs_p.log()[x], probs_q.log()[x]
    for est in ("k1", "k3"):
        assert float(core.kl_per_token(lp, lq, est).mean()) == pytest.approx(exact, abs=0.01)
    with pytest.raises(ValueError):
        core.kl_per_token(p, q, "k9")


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = core.per_token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert r.tolist() == [pytest.approx([-0.01, -0.02 + 2.0, 0.0]), pytest.approx([-0.05, -0.05, -0.05 - 1.0])]


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = core.policy_loss(new, old, adv, torch.ones(1, 2), cliprange=0.2)
    # token 1: min(1.5 * 1, 1.2 * 1) -> 1.2; token 2: min(0.5 * -1, 0.8 * -1) -> -0.8; loss = -mean
    assert float(loss) == pytest.approx(-(1.2 - 0.8) / 2)
    assert stats["policy/clipfrac"] == pytest.approx(1.0)
    loss, stats = core.policy_loss(old, old, adv, torch.ones(1, 2), cliprange=0.2)
    assert stats["policy/clipfrac"] == 0.0 and stats["policy/approxkl"] == 0.0


def test_value_loss_clips_the_update():
    old, ret = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    loss, stats = core.value_loss(torch.tensor([[1.0]]), old, ret, torch.ones(1, 1), cliprange_value=0.2)
    # plain error 0, clipped value 0.2 -> error 0.64; the max is taken: 0.5 * 0.64
    assert float(loss) == pytest.approx(0.32) and stats["val/clipfrac"] == 1.0


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = core.whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4) and w[0, 3] == 0.0
    assert float(core.masked_mean(x, mask)) == 2.0


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=100)  # over target: more penalty
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    up = ctl.value
    ctl.update(current_kl=1.0, n_steps=100)  # under target: less penalty
    assert ctl.value < up
    ctl.update(current_kl=float("nan"), n_steps=100)  # a NaN never moves it
    fixed = core.FixedKLController(0.1)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1


def test_kl_budget_pressure_rises_past_the_stop_line_and_eases_back_to_one():
    pressure = core.KLBudgetPressure(stop=9.0, rate=1.0)
    pressure.update(13.5)  # half past the stop: beta x e^0.5
    assert pressure.value == pytest.approx(math.exp(0.5))
    pressure.update(40.0)  # far past: the step is clipped at e^1
    assert pressure.value == pytest.approx(math.exp(1.5))
    pressure.update(0.0)  # far under: eases by at most e^-0.5 a candidate
    assert pressure.value == pytest.approx(math.exp(1.0))
    for _ in range(3):
        pressure.update(4.5)
    assert pressure.value == 1.0  # never under the controller's own beta
    pressure.update(float("nan"))  # an unmeasured candidate moves nothing
    assert pressure.value == 1.0
    pressure.update(float("inf"))  # an infinite KL: the largest step up
    assert pressure.value == pytest.approx(math.e)
    assert core.KLBudgetPressure(stop=9.0, rate=1.0, value=0.5).value == 1.0  # a resumed value is kept in range
    off = core.KLBudgetPressure(stop=9.0, rate=0.0)
    off.update(40.0)
    assert off.value == 1.0
    runaway = core.KLBudgetPressure(stop=9.0, rate=1.0)
    for _ in range(20):
        runaway.update(1e9)
    assert runaway.value == core.KLBudgetPressure.CEILING


def test_config_refuses_bad_values_by_name():
    assert PPOConfig().gamma == 1.0 and PPOConfig().lam == 0.95
    with pytest.raises(ConfigError, match="cliprange"):
        PPOConfig(cliprange=1.5)
    with pytest.raises(ConfigError, match="num_mini_batches"):
        PPOConfig(batch_size=2, num_mini_batches=4)


def test_leave_one_out_compares_each_reply_with_its_siblings_and_leaves_single_replies_alone():
    scores = torch.tensor([1.0, 3.0, 0.5, 2.0, 4.0, 6.0])
    out = core.leave_one_out(scores, ["a", "a", "solo", "b", "b", "b"])
    # a: 1 - 3, 3 - 1; b: 2 - (4 + 6) / 2, ...; solo unchanged
    assert out.tolist() == [-2.0, 2.0, 0.5, -3.0, 0.0, 3.0]
    assert scores.tolist() == [1.0, 3.0, 0.5, 2.0, 4.0, 6.0]  # the input is left as it was
