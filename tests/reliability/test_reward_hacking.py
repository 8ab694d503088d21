"""Reward hacking guard: a gameable reward drives PPO away from the reference; the KL budget stops the candidate.

The reward pays for length, which a policy can always raise by drifting from fluent text. Nothing
penalises that drift during the round (KL coefficient 0, a large learning rate), so only the gate's
KL budget stands between the candidate and the replicas: the round must be rejected for its KL,
publish nothing, and leave CURRENT where it was.
"""

from __future__ import annotations

import copy

from rlhf_online import config
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.config import TrainerSettings
from rlhf_online.ppo.policy import PolicyWithValue
from rlhf_online.ppo.trainer import Trainer
from rlhf_online.store import CompletionRecord, open_store

KL_BUDGET = 1.0


def gameable_reward(prompts, texts, completion_ids=()):
    """More characters, more reward: trivially gamed."""
    return [len(t) / 10 for t in texts]


def test_kl_budget_stops_a_gamed_policy(tiny, tmp_path, kit):
    settings = config.assemble(TrainerSettings, dict(
        port=0, metrics_port=0, data_dir=tmp_path, base_model="tiny", store_url=f"sqlite:///{tmp_path / 'store.db'}",
        round_interval_seconds=0, round_min_feedback=0, batch_size=8, response_length=16, eval_prompts=4,
        eval_samples_per_prompt=2, learning_rate=3e-2, init_kl_coef=0.0, adaptive_kl=False, kl_budget=KL_BUDGET))
    store = open_store(settings.store_url)
    store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about thing {i}.", messages=(),
                                            text="ok", policy_version="") for i in range(16)])
    registry = AdapterRegistry(settings.adapter_dir)
    # The served policy: a published LoRA that has not moved from the base (its B matrices are zero).
    served = registry.publish(PolicyWithValue(copy.deepcopy(tiny[0]), settings.ppo).save, base_model="tiny")
    registry.activate(served)
    trainer = Trainer(settings.trainer, settings.ppo, store, registry, gameable_reward,
                      lambda: (copy.deepcopy(tiny[0]), tiny[1]), base_model=settings.base_model)
    rejected = kit.sample("rlhf_trainer_rounds_total", outcome="rejected")

    result = trainer.run_round()

    assert result.outcome == "rejected", (result.outcome, result.reason)
    assert "KL to reference" in result.reason and "over budget" in result.reason, result.reason
    kl, kl_served = result.metrics["eval/kl"], result.metrics["eval/kl_current"]
    assert kl > KL_BUDGET > kl_served, (kl, kl_served)  # the candidate drifted; the served policy had not
    assert registry.current() == served and registry.versions() == [served]
    assert kit.sample("rlhf_trainer_rounds_total", outcome="rejected") == rejected + 1
    assert kit.sample("rlhf_ppo_stat", name="eval/kl") == kl  # visible to the operator
    store.close()
