"""One PPO update on fixed samples, on however many ranks started it: `python round_worker.py MODEL OUT`
(one process) or `torchrun --nproc-per-node N round_worker.py MODEL OUT`. Rank 0 writes the trained weights."""

from __future__ import annotations

import sys

import torch

from rlhf_online.models.provision import load_model
from rlhf_online.ppo import distributed, steps
from rlhf_online.ppo.config import PPOConfig
from rlhf_online.ppo.policy import PolicyWithValue

ROWS = 11  # odd: the ranks' shares differ in size, and one micro-batch is short


def main(model_dir: str, out: str) -> None:
    ranks = distributed.from_environment("gloo")
    torch.set_num_threads(1)
    model, tok = load_model(model_dir)
    cfg = PPOConfig(num_ppo_epochs=2, num_mini_batches=2, per_device_train_batch_size=2,
                    local_rollout_forward_batch_size=3, learning_rate=3e-3, early_stop_approxkl=0.0,
                    compute_dtype="float32")  # bf16 products round differently for different row splits
    torch.manual_seed(0)  # the same LoRA initialisation on every rank and world size
    policy = PolicyWithValue(model, cfg)
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(ROWS):
        prompt = f"Question {i}: what is {i} plus {i}?"
        prompt_ids = tuple(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
        response = torch.randint(10, 1000, (3 + i % 5,), generator=gen).tolist()
        samples.append(steps.Sample(prompt, prompt_ids, tuple(response), True, tok.decode(response)))
    scores = torch.randn(ROWS, generator=gen)
    before = policy.trainable_state()
    rollouts = steps.measure(policy, samples, tok.pad_token_id, cfg, ranks)
    adv, returns, _ = steps.advantages(rollouts, scores, 0.05, cfg)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate)
    torch.manual_seed(2)  # rank 0's minibatch order (the others take it from rank 0)
    stats = steps.update(policy, optimizer, rollouts, adv, returns, cfg, ranks)
    if ranks.is_leader:
        torch.save({"before": before, "after": policy.trainable_state(), "logprobs": rollouts.logprobs,
                    "values": rollouts.values, "epochs": stats["policy/epochs"], "world": ranks.world}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
