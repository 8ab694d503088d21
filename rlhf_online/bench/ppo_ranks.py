"""`rlhf-online bench ppo --world-size N`: the data-parallel part of a PPO round on 1 rank and on N, same work.

What the trainer's ranks share (rlhf_online.ppo.distributed) is the forward passes over a round's
samples (policy and reference log-probs, values) and the PPO epochs; sampling, scoring and the gate
run on rank 0 alone. So the benchmark samples the rollouts once, in this process (seeded), and times
measure -> score -> advantages -> update on the same samples under torchrun with 1 rank and with N
(`python -m torch.distributed.run --standalone`, gloo), the same seed and LoRA initialisation. Each
side gets the same CPU threads in all: 1 rank x T threads against N ranks x T/N threads (on one
machine the ranks share its cores). One sample = one row of a step's batch; the median step gives
samples/s, speedup = N ranks' samples/s over 1 rank's, scaling efficiency = speedup / N. The trained
adapters of both sides are compared too: the largest absolute difference of any weight, next to the
largest change training made to any weight (Adam's steps are about the learning rate wherever the
gradient is not ~0, so where a gradient is near zero the order of the ranks' sums can flip a step),
and as a whole: the norm of the difference over the norm of the change training made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_online.bench.common import machine, write_report


def main(args: argparse.Namespace, path: Path) -> int:
    """Sample once, run both world sizes on the samples, report samples/s, speedup and the adapters' difference."""
    from rlhf_online.bench.ppo import PROMPTS
    from rlhf_online.models.provision import load_model
    from rlhf_online.ppo import steps
    from rlhf_online.ppo.policy import PolicyWithValue

    torch.set_num_threads(args.threads)
    cfg = _ppo_config(args)
    torch.manual_seed(args.seed)
    model, tok = load_model(path)
    policy = PolicyWithValue(model, cfg)
    batches, t0 = [], time.perf_counter()
    for step in range(args.steps + 1):
        start = (step * cfg.batch_size) % len(PROMPTS)
        prompts = [PROMPTS[(start + i) % len(PROMPTS)] for i in range(cfg.batch_size)]
        batches.append(steps.sample(policy, tok, prompts, cfg, seed=args.seed + step))
    sampling_s = (time.perf_counter() - t0) / len(batches)
    del model, policy
    with tempfile.TemporaryDirectory(prefix="bench-ppo-ranks-") as tmp:
        samples = Path(tmp) / "samples.pt"
        torch.save(batches, samples)
        sides = {}
        for world in sorted({1, args.world_size}):
            threads = max(1, args.threads // world)
            print(f"bench ppo: {world} rank(s) x {threads} thread(s)", flush=True)
            sides[str(world)] = _run_world(world, threads, samples, Path(tmp) / f"world{world}.pt", path, args)
    one, many = sides["1"], sides[str(args.world_size)]
    speedup = many["samples_per_s"] / one["samples_per_s"]
    a, b, before = one.pop("state"), many.pop("state"), one.pop("before")
    many.pop("before")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - before[k]).abs().max().item() for k in a)  # how far training moved any weight
    # as a whole: the norm of the difference over the norm of what training changed
    relative = (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum(((a[k] - before[k]) ** 2).sum() for k in a)) ** 0.5
    result = {"benchmark": "ppo_world_size", "machine": machine(), "versions": {"torch": torch.__version__},
              "settings": {**_settings(args, path), "sampling_s_per_step": round(sampling_s, 2)},
              "sides": sides, "speedup": speedup, "scaling_efficiency": speedup / args.world_size,
              "max_abs_weight_difference": diff, "max_abs_weight_change": moved,
              "relative_difference": float(relative)}
    write_report(args.out, "ppo_world_size", result, table(args, result))
    return 0


def _ppo_config(args: argparse.Namespace) -> Any:
    from rlhf_online.ppo.config import PPOConfig

    # early_stop_approxkl=0: every step runs all epochs on both sides (no data-dependent early stop)
    return PPOConfig(batch_size=args.batch_size, response_length=args.response_length,
                     num_ppo_epochs=args.num_ppo_epochs, num_mini_batches=args.num_mini_batches,
                     learning_rate=args.learning_rate, early_stop_approxkl=0.0, seed=args.seed,
                     compute_dtype=args.compute_dtype)


def _run_world(world: int, threads: int, samples: Path, out: Path, path: Path, args: argparse.Namespace
               ) -> dict[str, Any]:
    """The timed steps on `world` ranks under torchrun: step seconds, samples/s and the trained weights."""
    spec = json.dumps({"model": str(path), "threads": threads, "seed": args.seed, "batch_size": args.batch_size,
                       "response_length": args.response_length, "num_ppo_epochs": args.num_ppo_epochs,
                       "num_mini_batches": args.num_mini_batches, "learning_rate": args.learning_rate,
                       "compute_dtype": args.compute_dtype})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", "rlhf_online.bench.ppo_ranks", str(samples), str(out), spec]
    subprocess.run(cmd, check=True)
    got = torch.load(out, weights_only=False)
    step_s = got["step_s"][1:]  # the first step warms up
    return {"ranks": world, "threads_per_rank": threads, "warmup_s": got["step_s"][0], "step_s": step_s,
            "samples_per_s": args.batch_size / statistics.median(step_s), "state": got["state"],
            "before": got["before"]}


def worker(samples: str, out: str, spec_json: str) -> None:
    """One rank (torchrun): measure -> score (rank 0) -> advantages -> update on each batch, timed on rank 0."""
    from rlhf_online.bench.ppo import scripted_reward
    from rlhf_online.models.provision import load_model
    from rlhf_online.ppo import distributed, steps
    from rlhf_online.ppo.policy import PolicyWithValue

    spec = json.loads(spec_json)
    ranks = distributed.from_environment("gloo")
    torch.set_num_threads(spec["threads"])
    cfg = _ppo_config(argparse.Namespace(**spec))
    model, tok = load_model(spec["model"])
    torch.manual_seed(spec["seed"])  # the same LoRA initialisation on every rank and world size
    policy = PolicyWithValue(model, cfg)
    before = policy.trainable_state()
    times = []
    for step, batch in enumerate(torch.load(samples, weights_only=False)):
        t0 = time.perf_counter()
        rollouts = steps.measure(policy, batch, tok.pad_token_id, cfg, ranks)
        scores = ranks.broadcast(steps.score(rollouts, scripted_reward, cfg) if ranks.is_leader else None)
        adv, returns, _ = steps.advantages(rollouts, scores, cfg.init_kl_coef, cfg)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate)
        torch.manual_seed(spec["seed"] + step)  # rank 0's minibatch order (the others take it from rank 0)
        steps.update(policy, optimizer, rollouts, adv, returns, cfg, ranks)
        times.append(time.perf_counter() - t0)
        if ranks.is_leader:
            print(f"  {ranks.world} rank(s) step {step}: {times[-1]:.1f}s", flush=True)
    if ranks.is_leader:
        torch.save({"step_s": times, "state": policy.trainable_state(), "before": before}, out)


def _settings(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    return {"model": str(path), "lora": "r16, alpha 32, dropout 0, q/k/v/o", "batch_size": args.batch_size,
            "response_length": args.response_length, "num_ppo_epochs": args.num_ppo_epochs,
            "num_mini_batches": args.num_mini_batches, "threads_in_all": args.threads, "steps": args.steps,
            "backend": "gloo", "dtype": args.compute_dtype, "world_size": args.world_size}


def table(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    """The Markdown report: one row per world size, speedup, efficiency, the adapters' difference."""
    s = result["settings"]
    lines = [f"# PPO data parallelism ({result['machine']}, {args.threads} threads in all)", "",
             f"SmolLM2-135M-Instruct + LoRA r16 q/k/v/o, batch {s['batch_size']}, {s['response_length']}-token "
             f"responses sampled once ({s['sampling_s_per_step']:.1f} s per batch on rank 0, not in the step), "
             f"{s['num_ppo_epochs']} PPO epochs x {s['num_mini_batches']} minibatches, fp32, gloo; median of "
             f"{s['steps']} steps after 1 warm-up; a step = measure + score + advantages + update.", "",
             "| ranks x threads | samples/s | median step (s) | steps (s) | warm-up (s) |", "|---|---|---|---|---|"]
    for side in result["sides"].values():
        lines.append(f"| {side['ranks']} x {side['threads_per_rank']} | {side['samples_per_s']:.3f} | "
                     f"{statistics.median(side['step_s']):.1f} | " + ", ".join(f"{x:.1f}" for x in side["step_s"])
                     + f" | {side['warmup_s']:.1f} |")
    lines += ["", f"**speedup {result['speedup']:.2f}x, scaling efficiency {result['scaling_efficiency']:.2f}**; "
                  f"the two adapters differ by at most {result['max_abs_weight_difference']:.2e} in any weight, "
                  f"training moved weights by up to {result['max_abs_weight_change']:.2e}; as a whole "
                  f"||N ranks - 1 rank|| / ||1 rank - start|| = {result['relative_difference']:.2%}"]
    return lines


if __name__ == "__main__":
    worker(*sys.argv[1:4])
