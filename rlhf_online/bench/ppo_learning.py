"""`rlhf-online bench ppo-learning`: how far PPO rounds move a scripted reward, and at what KL, per variant of the update.

Throughput (`bench ppo`) says how fast a round runs; this says how much a round teaches. Each
variant trains SmolLM2 + a fresh LoRA from the bare base for --rounds rounds the way the trainer
does (batch_size own rollouts of `bench ppo`'s fixed prompts, one forward for log-probs and values, scores,
advantages, num_ppo_epochs of minibatch PPO), against a scripted reward (VADER sentiment of the
reply, the shape of the demo's users' taste), and every --eval-every rounds judges the policy as
the trainer's gate does: eval prompts x samples replies with a fixed seed, their mean reward and
their KL to the reference. Variants run one after another with the same seeds, in one run, so the
comparison is within the run (these machines' speed varies from day to day):

- fresh: a new AdamW every round, as the trainer does (rlhf_online.ppo.trainer);
- kept: the AdamW of the round that made the policy goes on in the next (TRL's PPOTrainer keeps one
  optimizer for the whole run), so its moments average the gradients of many rounds' rollouts.

Why the trainer starts afresh: at the demo's settings (lr 1e-3, 8 rollouts a round) the kept
moments carry each round's direction into the next, and the policy drifts further from the
reference for no more reward (docs/benchmarks.md, "What a round teaches").
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_online.bench.common import machine, write_report
from rlhf_online.bench.ppo import PROMPTS, own_rollouts_round, scripted_reward

VARIANTS = ("fresh", "kept")
HELDOUT = [  # not in PROMPTS: the gate judges on prompts the rounds never trained on
    "Describe a rainy Monday commute.", "What do you think of crowded trains?", "Reply to a rude email from a stranger.",
    "Give your opinion on long meetings.", "Write a note to a neighbour whose dog barks at night.",
    "Review a restaurant that lost your booking.", "What do you think of queues at the post office?",
    "Describe your first day at a new job.", "Tell me about a noisy hotel night.", "What do you think of winter?",
    "Write a message to a friend who cancelled on you.", "Give your honest opinion of airport food.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the learning benchmark."""
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=4, help="judge the policy after every this many rounds")
    p.add_argument("--seeds", type=int, default=2, help="repeats of every variant (seeds 0..N-1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="the demo's")
    p.add_argument("--init-kl-coef", type=float, default=0.02, help="the demo's")
    p.add_argument("--eval-samples", type=int, default=2, help="replies per held-out prompt")
    p.add_argument("--compute-dtype", default="auto")
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="bench-results")


def run_variant(variant: str, seed: int, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """--rounds rounds of one variant from the bare base; the evaluations along the way."""
    from rlhf_online.models.provision import load_model
    from rlhf_online.ppo import steps
    from rlhf_online.ppo.config import PPOConfig
    from rlhf_online.ppo.core import FixedKLController
    from rlhf_online.ppo.policy import PolicyWithValue

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model(model_dir)
    cfg = PPOConfig(batch_size=args.batch_size, response_length=args.response_length,
                    num_ppo_epochs=args.num_ppo_epochs, learning_rate=args.learning_rate,
                    init_kl_coef=args.init_kl_coef, compute_dtype=args.compute_dtype, seed=seed)
    policy = PolicyWithValue(model, cfg)
    kl_ctl = FixedKLController(cfg.init_kl_coef)  # the demo's adaptive controller barely moves in 12 rounds
    optimizer_state = None
    curve, seconds = [], 0.0

    def judge(round_: int) -> None:
        ev = steps.evaluate(policy, tok, HELDOUT, scripted_reward, cfg, seed=1234, samples_per_prompt=args.eval_samples)
        curve.append({"round": round_, "reward": ev["eval/reward"], "kl": ev["eval/kl"], "train_seconds": seconds})
        print(f"{variant} seed {seed} round {round_}: held-out reward {ev['eval/reward']:+.3f}, KL {ev['eval/kl']:.2f}, "
              f"{seconds:.0f} s of training", flush=True)

    judge(0)
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate)
        if variant == "kept" and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        prompts = [rng.choice(PROMPTS) for _ in range(cfg.batch_size)]
        own_rollouts_round(policy, tok, prompts, cfg, scripted_reward, kl_ctl.value, optimizer)
        optimizer_state = optimizer.state_dict()
        seconds += time.perf_counter() - t0
        if r % args.eval_every == 0 or r == args.rounds:
            judge(r)
    return {"variant": variant, "seed": seed, "curve": curve}


def table(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    """Held-out reward and KL per variant at each evaluation, medians over the seeds."""
    lines = [f"PPO learning per variant — {result['machine']}, {result['date']}", "",
             f"{args.rounds} rounds of {args.batch_size} own rollouts ({args.response_length} tokens, lr "
             f"{args.learning_rate:g}, beta {args.init_kl_coef:g}, {args.num_ppo_epochs} epochs), scripted reward "
             f"(VADER sentiment); held-out: {len(HELDOUT)} prompts x {args.eval_samples} replies, fixed seed; "
             f"medians over {args.seeds} seeds (each seed's numbers in the JSON).", "",
             "| variant | round | held-out reward | KL | reward gain per nat of KL | training seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant in result["variants"]:
        runs = [r for r in result["runs"] if r["variant"] == variant]
        for i, point in enumerate(runs[0]["curve"]):
            reward = statistics.median(r["curve"][i]["reward"] for r in runs)
            kl = statistics.median(r["curve"][i]["kl"] for r in runs)
            gains = [(r["curve"][i]["reward"] - r["curve"][0]["reward"]) / r["curve"][i]["kl"]
                     for r in runs if r["curve"][i]["kl"] > 0]
            per_kl = f"{statistics.median(gains):+.3f}" if gains and point["round"] else "-"
            secs = statistics.median(r["curve"][i]["train_seconds"] for r in runs)
            lines.append(f"| {variant} | {point['round']} | {reward:+.3f} | {kl:.2f} | {per_kl} | {secs:.0f} |")
    return lines


def main(args: argparse.Namespace) -> int:
    """Run every variant for every seed; write ppo_learning.json and .md."""
    from rlhf_online.models.provision import resolve_base_model

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {', '.join(unknown) or '(none given)'} (want some of {', '.join(VARIANTS)})")
    model_dir = resolve_base_model(args.base_model, Path(args.data_dir))
    runs = [run_variant(v, seed, args, model_dir) for seed in range(args.seeds) for v in variants]
    result = {"benchmark": "ppo-learning", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "variants": variants, "settings": {k: v for k, v in vars(args).items() if isinstance(v, str | int | float)}, "runs": runs}
    write_report(args.out, "ppo_learning", result, table(args, result))
    return 0
