"""Trainer rounds on however many ranks started it: `python trainer_worker.py MODEL DIR` or
`torchrun --nproc-per-node N trainer_worker.py MODEL DIR`. Rank 0 is the trainer (a SQLite store, a
registry, a scripted reward; the first scoring fails when DIR/fail_first exists), the others follow;
the outcome and the published weights go to DIR/result.json and DIR/weights.pt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.errors import Unavailable
from rlhf_online.ppo import distributed
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.policy import PolicyWithValue
from rlhf_online.ppo.trainer import Trainer, follow, load_base_model
from rlhf_online.store import CompletionRecord, open_store

PPO = PPOConfig(batch_size=6, response_length=8, num_ppo_epochs=2, num_mini_batches=2, per_device_train_batch_size=2,
                learning_rate=3e-3, early_stop_approxkl=0.0, compute_dtype="float32")  # exact comparisons


class PassingGate(Trainer):
    """The gate always passes: the test compares what the rounds trained, whatever a gate would make of it."""

    def _gate(self, policy, served_weights, current):
        return True, "gate skipped by the test", {}


def main(model_dir: str, out: str) -> None:
    ranks = distributed.from_environment("gloo")
    torch.set_num_threads(1)
    base = load_base_model(Path(model_dir))
    if not ranks.is_leader:
        (Path(out) / f"rank{ranks.rank}.json").write_text(json.dumps({"rounds": follow(PPO, base, ranks)}))
        return
    store = open_store(f"sqlite:///{Path(out) / 'store.db'}")
    store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about topic {i}.", messages=(),
                                            text="ok", policy_version="") for i in range(12)])
    failures = [Path(out, "fail_first").exists()]

    def reward(prompts, texts, ids=()):
        if failures[0]:
            failures[0] = False
            raise Unavailable("the reward service at test did not score")
        return [len(t) % 7 / 7 for t in texts]

    registry = AdapterRegistry(Path(out) / "adapters")
    trainer = PassingGate(TrainerConfig(learn_from_traffic=False), PPO, store, registry, reward, base,
                          base_model="tiny", ranks=ranks)
    torch.manual_seed(0)
    results = [trainer.run_round()]
    if results[0].outcome != "published":  # the failed first round: the next one must work
        results.append(trainer.run_round())
    trainer.release_followers()
    version = registry.current()
    weights = PolicyWithValue(base()[0], PPO, registry.path(version)).trainable_state() if version else {}
    torch.save(weights, Path(out) / "weights.pt")
    (Path(out) / "result.json").write_text(json.dumps({
        "world": ranks.world, "outcomes": [r.outcome for r in results], "reasons": [r.reason for r in results],
        "version": version}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
