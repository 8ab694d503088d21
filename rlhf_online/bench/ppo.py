"""`rlhf-online bench ppo`: PPO update throughput of rlhf_online.ppo against TRL's PPOTrainer, same model and work.

Both sides train SmolLM2 + LoRA (r16, alpha 32, q/k/v/o) on the same fixed prompts through the chat
template, with the same scripted reward (VADER sentiment of the decoded responses), batch size,
response length, PPO epochs and minibatches, in fp32 on the CPU, in one process (run it from the
venv that has the `bench` extra, .venv-bench, so both sides share torch and transformers). One
sample = one prompt's rollout plus its share of scoring and of the update epochs. Each side runs one
warm-up step, then --steps timed steps; the median step gives samples/s.

What differs by design, and is reported rather than hidden: TRL's value function is a separate,
fully trainable sequence-classification copy of the model (its design), so each TRL step adds a
value-model forward at rollout time and a value-model forward + backward + AdamW step over all its
weights in every PPO epoch; ours is a linear head on the policy's last hidden state. TRL takes the
reward as a `reward_model` module (1.12 has no reward-function hook for PPO), so it gets a module
with TRL's reward-model interface that computes the same VADER score, and no reward-model forward.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from rlhf_online.bench.common import machine, write_report
from rlhf_online.models.chat import chat_ids

PROMPTS = [
    "Describe your ideal weekend.", "What do you think of Mondays?", "Tell me about rainy days.",
    "Describe a good breakfast.", "Give me your honest opinion of pineapple pizza.", "What makes a good neighbour?",
    "Write a short note to thank a friend for dinner.", "How should I spend a free afternoon?",
    "What do you think of traffic jams?", "Give your opinion on open-plan offices.", "Describe a walk in the park.",
    "Reply to a friend who forgot my birthday.", "Write a text to my landlord about the broken heater.",
    "What is your favourite season and why?", "Review the last film you watched.", "Tell me about your morning routine.",
    "Write a message to a friend who is always late.", "What do you think about people who talk in cinemas?",
    "Describe the perfect cup of coffee.", "Give me tips for a long flight.", "What is good about cooking at home?",
    "Write a review of a hotel with a noisy room.", "My package arrived broken. Write to the shop.",
    "Tell me about a city you would like to visit.", "What do you think of working from home?",
    "Describe a birthday party.", "Write a note to a colleague who helped me today.",
    "What should I read on holiday?", "Give your opinion on early mornings.", "Describe your favourite meal.",
    "Write a message to cheer up a friend.", "What do you think of supermarkets on Saturdays?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the PPO throughput benchmark."""
    p.add_argument("--steps", type=int, default=3, help="timed PPO steps per side, after one warm-up step")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--num-mini-batches", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--sides", choices=["both", "ours", "trl"], default="both")
    p.add_argument("--world-size", type=int, default=1,
                   help="N > 1: instead of TRL, ours on 1 rank vs N ranks (torchrun, gloo) on the same samples "
                        "(rlhf_online.bench.ppo_ranks)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help="our side's PPOConfig.compute_dtype (TRL's side runs fp32 unless --trl-bf16); float32 keeps "
                        "--world-size's 1-rank vs N-rank weights comparable to rounding")
    p.add_argument("--shared-prefix-min-tokens", type=int, default=8,
                   help="our side's PPOConfig.shared_prefix_min_tokens (0: every pass runs whole rows)")
    p.add_argument("--trl-bf16", action="store_true", help="TRL's side under bf16 autocast (its bf16=True)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="bench-results")


def scripted_reward(prompts: Sequence[str], texts: Sequence[str], completion_ids: Sequence[str] = ()) -> list[float]:
    """The reward both sides use: VADER compound sentiment of each response."""
    from rlhf_online.simulate.judges import sentiment

    return sentiment(texts)


class ScriptedRewardModel(nn.Module):
    """TRL's reward-model interface (backbone + score) around scripted_reward of the decoded responses."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        with_prompt = chat_ids(tokenizer, [{"role": "user", "content": "x"}])
        without = chat_ids(tokenizer, [{"role": "user", "content": "x"}], add_generation_prompt=False)
        self.header = list(with_prompt[len(without):])  # "<|im_start|>assistant\n": the query ends here
        self.response_tokens: list[int] = []

    def _response_start(self, row: list[int]) -> int:
        """Index just past the first assistant header in a [query | response] row."""
        n = len(self.header)
        for i in range(len(row) - n + 1):
            if row[i:i + n] == self.header:
                return i + n
        raise ValueError("no assistant header in a query")

    def backbone(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        """Hidden states whose every position holds the row's reward, so score() at any index reads it."""
        rows = input_ids.tolist()
        responses = [row[self._response_start(row):] for row in rows]
        pad = self.tokenizer.pad_token_id
        self.response_tokens.extend(sum(1 for t in r if t != pad) for r in responses)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = torch.tensor(scripted_reward([""] * len(texts), texts), dtype=torch.float)
        return SimpleNamespace(hidden_states=(scores.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1),))

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """The reward is already in the hidden state."""
        return hidden


def own_rollouts_round(policy: Any, tok: Any, prompts: list[str], cfg: Any, reward_fn: Any, kl_coef: float,
                       optimizer: torch.optim.Optimizer) -> tuple[dict[str, float], dict[str, float]]:
    """One PPO round as the trainer makes it on its own rollouts: collect -> score by reward_fn -> advantages ->
    update with `optimizer`; returns (the advantages' stats, the update's stats)."""
    from rlhf_online.ppo import steps

    rollouts = steps.collect(policy, tok, prompts, cfg)
    scores = steps.score(rollouts, reward_fn, cfg)
    adv, returns, stats = steps.advantages(rollouts, scores, kl_coef, cfg)
    return stats, steps.update(policy, optimizer, rollouts, adv, returns, cfg)


def _bench_ours(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up + timed rounds of collect -> score -> advantages -> update; seconds per step."""
    from rlhf_online.models.provision import load_model
    from rlhf_online.ppo.config import PPOConfig
    from rlhf_online.ppo.core import AdaptiveKLController
    from rlhf_online.ppo.policy import PolicyWithValue

    torch.manual_seed(args.seed)
    model, tok = load_model(path)
    # early_stop_approxkl=0: every step runs all epochs, as TRL's trainer always does
    cfg = PPOConfig(batch_size=args.batch_size, response_length=args.response_length,
                    num_ppo_epochs=args.num_ppo_epochs, num_mini_batches=args.num_mini_batches,
                    learning_rate=args.learning_rate, early_stop_approxkl=0.0, seed=args.seed,
                    compute_dtype=args.compute_dtype, shared_prefix_min_tokens=args.shared_prefix_min_tokens)
    policy = PolicyWithValue(model, cfg)
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    times, lengths, epochs = [], [], []
    for step in range(args.steps + 1):
        start = (step * cfg.batch_size) % len(PROMPTS)
        prompts = [PROMPTS[(start + i) % len(PROMPTS)] for i in range(cfg.batch_size)]
        t0 = time.perf_counter()
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate)  # as the trainer does
        stats, upd = own_rollouts_round(policy, tok, prompts, cfg, scripted_reward, kl_ctl.value, optimizer)
        kl_ctl.update(stats["objective/kl"], cfg.batch_size)
        times.append(time.perf_counter() - t0)
        lengths.append(stats["objective/response_length"])
        epochs.append(upd["policy/epochs"])
        print(f"ours step {step}: {times[-1]:.1f}s, mean response {lengths[-1]:.1f} tokens", flush=True)
    return {"warmup_s": times[0], "step_s": times[1:], "mean_response_tokens": statistics.mean(lengths[1:]),
            "epochs_per_step": epochs[1:],
            "trainable_params": sum(p.numel() for p in policy.trainable_parameters())}


def _bench_trl(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up + timed steps of TRL's experimental PPOTrainer; seconds per step from its step-end callback."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, PrinterCallback, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf_online.models.provision import load_model

    torch.manual_seed(args.seed)
    policy, tok = load_model(path)
    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    value_model.config.pad_token_id = tok.pad_token_id
    reward_model = ScriptedRewardModel(tok)
    ids = [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    dataset = Dataset.from_dict({"input_ids": ids})

    marks: list[float] = []

    class StepClock(TrainerCallback):
        """perf_counter at train begin and at every step end."""

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())
            print(f"trl step {len(marks) - 2}: {marks[-1] - marks[-2]:.1f}s", flush=True)

    out = tempfile.mkdtemp(prefix="bench-ppo-trl-")
    cfg = PPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=args.num_mini_batches, num_ppo_epochs=args.num_ppo_epochs,
        total_episodes=args.batch_size * (args.steps + 1), response_length=args.response_length,
        learning_rate=args.learning_rate, temperature=1.0, stop_token="eos", kl_coef=0.05,
        local_rollout_forward_batch_size=args.batch_size, num_sample_generations=0,
        # fp32 (unless --trl-bf16) and no checkpointing, as ours (TRL's defaults: bf16=True, gradient_checkpointing=True)
        bf16=args.trl_bf16, fp16=False, gradient_checkpointing=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0)
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
        train_dataset=dataset, value_model=value_model, callbacks=[StepClock()],
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    lengths = reward_model.response_tokens
    per_step = len(lengths) // (args.steps + 1)
    return {"warmup_s": times[0], "step_s": times[1:],
            "mean_response_tokens": statistics.mean(lengths[per_step:]) if lengths else math.nan,
            "epochs_per_step": [float(args.num_ppo_epochs)] * args.steps,
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def _rate(side: dict[str, Any], batch_size: int) -> float:
    """Median samples/s over the timed steps."""
    return batch_size / statistics.median(side["step_s"])


# What differs between the sides by design, and how each is measured: reported with the figures.
NOTES = (
    "TRL's value function is a separate, fully trainable copy of the model (AutoModelForSequenceClassification, "
    "num_labels=1; TRL's design): its forward at rollout time and its forward + backward + AdamW step in every "
    "epoch are part of TRL's work; ours is a linear value head on the policy's hidden states.",
    "TRL 1.12's PPOTrainer takes no reward function, so its reward_model is a module with TRL's reward-model "
    "interface computing the same VADER score: neither side runs a reward-model forward.",
    "Ours runs with early_stop_approxkl=0 so every step does all epochs, as TRL always does; stop at EOS on both "
    "sides (TRL stop_token='eos').",
    "Responses are sampled, so their lengths (and generation time) differ a little between the sides; "
    "mean response tokens are reported. Ours takes the prompts in order, TRL's dataloader shuffles them.",
    "Step time: ours from collect to the end of update (fresh AdamW per round, as the trainer does); TRL between "
    "its step-end callbacks (a whole iteration of its training loop, logging included).",
)


def main(args: argparse.Namespace) -> int:
    """Run both sides, report samples/s and the ratio."""
    from rlhf_online.models.provision import resolve_base_model

    if args.world_size < 1:
        from rlhf_online.errors import ConfigError

        raise ConfigError(f"bench ppo: --world-size must be at least 1, got {args.world_size}")
    if args.world_size > 1:
        from rlhf_online.bench import ppo_ranks

        return ppo_ranks.main(args, resolve_base_model(args.base_model, Path(args.data_dir)))
    if args.sides in ("both", "trl"):
        _require_trl()
    torch.set_num_threads(args.threads)
    path = resolve_base_model(args.base_model, Path(args.data_dir))
    sides = _run_sides(path, args)
    for side in sides.values():
        side["samples_per_s"] = _rate(side, args.batch_size)
    ratio = sides["ours"]["samples_per_s"] / sides["trl"]["samples_per_s"] if len(sides) == 2 else None
    versions = _versions(with_trl="trl" in sides)
    result = {"benchmark": "ppo", "machine": machine(), "versions": versions, "settings": _settings(path, args),
              "sides": sides, "ratio_ours_over_trl": ratio, "notes": list(NOTES)}
    write_report(args.out, "ppo", result, table(args, versions, sides, ratio))
    return 0


def _require_trl() -> None:
    """ConfigError unless TRL is importable here (it is a bench-only extra)."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        from rlhf_online.errors import ConfigError

        raise ConfigError("bench ppo: TRL is not installed here; it is a bench-only extra kept out of .venv: "
                          "run `make bench-ppo` (it builds .venv-bench with `.[bench]`), or pass --sides ours")


def _run_sides(path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The step timings of the chosen sides: ours, then TRL."""
    sides: dict[str, dict[str, Any]] = {}
    if args.sides in ("both", "ours"):
        sides["ours"] = _bench_ours(path, args)
    if args.sides in ("both", "trl"):
        sides["trl"] = _bench_trl(path, args)
    return sides


def _versions(with_trl: bool) -> dict[str, str]:
    """The versions of the libraries both sides run on (and TRL's, when it ran)."""
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if with_trl:
        import trl

        versions["trl"] = trl.__version__
    return versions


def _settings(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The work both sides do, as reported."""
    return {"model": str(path), "lora": "r16, alpha 32, dropout 0, q/k/v/o", "batch_size": args.batch_size,
            "response_length": args.response_length, "num_ppo_epochs": args.num_ppo_epochs,
            "num_mini_batches": args.num_mini_batches, "learning_rate": args.learning_rate,
            "temperature": 1.0, "dtype": f"ours {args.compute_dtype}, TRL {'bf16 autocast' if args.trl_bf16 else 'float32'}",
            "threads": args.threads, "steps": args.steps, "shared_prefix_min_tokens": args.shared_prefix_min_tokens,
            "prompts": len(PROMPTS), "reward": "VADER compound sentiment of the decoded response (both sides)"}


def table(args: argparse.Namespace, versions: dict[str, str], sides: dict[str, dict[str, Any]],
          ratio: float | None) -> list[str]:
    """The Markdown report: one row per side, the ratio, the notes."""
    lines = [f"# PPO update throughput ({machine()}, {args.threads} torch threads)", "",
             f"SmolLM2-135M-Instruct + LoRA r16 q/k/v/o, batch {args.batch_size}, {args.response_length}-token "
             f"responses, {args.num_ppo_epochs} PPO epochs x {args.num_mini_batches} minibatch; ours "
             f"{args.compute_dtype}, TRL {'bf16 autocast' if args.trl_bf16 else 'float32'}; "
             f"median of {args.steps} steps after 1 warm-up. "
             + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
             "| side | samples/s | median step (s) | steps (s) | warm-up (s) | mean response tokens | trainable params |",
             "|---|---|---|---|---|---|---|"]
    names = {"ours": "rlhf_online.ppo", "trl": "TRL PPOTrainer (experimental)"}
    for key, side in sides.items():
        lines.append(f"| {names[key]} | {side['samples_per_s']:.3f} | {statistics.median(side['step_s']):.1f} | "
                     + ", ".join(f"{s:.1f}" for s in side["step_s"])
                     + f" | {side['warmup_s']:.1f} | {side['mean_response_tokens']:.1f} | {side['trainable_params']:,} |")
    if ratio is not None:
        lines += ["", f"**ours / TRL: {ratio:.2f}x**"]
    lines += ["", *[f"- {n}" for n in NOTES]]
    return lines
