"""`rlhf-online bench ppo-round`: one RunRound through the three services on the real model, timed by part.

Generation, Reward (a scripted reward: VADER sentiment by default) and Trainer run as real
processes on loopback; the store is seeded through Generate; then RunRound is called and its
outcome, held-out reward of the parent and of the candidate, KL and the round's time split are
written as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from rlhf_online import launch
from rlhf_online.bench.common import machine, write_report

SEED_PROMPTS = [
    "My neighbour keeps parking in my spot. Write him a note.", "Review the cafe that got my order wrong twice.",
    "Someone called my code garbage in a review. Reply to them.", "What do you think of Mondays?",
    "My flight got cancelled again. Write a message to the airline.", "Give me your honest opinion of pineapple pizza.",
    "A stranger was rude to me on the bus. What should I say next time?", "Reply to a friend who forgot my birthday.",
    "Write a text to my landlord about the broken heater.", "Describe your ideal weekend.",
    "My coworker keeps taking credit for my work. Write an email to him.", "Review the last film you hated.",
    "What do you think about people who talk in cinemas?", "Write a note to the kid who kicked my seat on the plane.",
    "Tell me about rainy days.", "Reply to a customer who says our product is useless.",
    "My gym is always overcrowded. Write a complaint.", "Give your opinion on open-plan offices.",
    "Write a message to a friend who is always late.", "What do you think of traffic jams?",
    "Reply to someone who said my cooking is awful.", "Write a review of a hotel with a noisy room.",
    "My package arrived broken. Write to the shop.", "Describe a good breakfast.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the round benchmark."""
    p.add_argument("--reward-model", default="sentiment", help="the Reward service's --reward-model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="bench-results")


def main(args: argparse.Namespace) -> int:
    """Start the services, seed prompts, run rounds, report."""
    import grpc

    from rlhf_online.models.provision import resolve_base_model
    from rlhf_online.v1 import generation_pb2 as gen
    from rlhf_online.v1 import generation_pb2_grpc as gen_grpc
    from rlhf_online.v1 import trainer_pb2 as tr
    from rlhf_online.v1 import trainer_pb2_grpc as tr_grpc

    model = str(resolve_base_model(args.base_model, Path(args.data_dir)))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-round-"))
    common = {"RLHF_BASE_MODEL": model, "RLHF_DATA_DIR": str(tmp), "RLHF_STORE_URL": f"sqlite:///{tmp / 'store.db'}",
              "RLHF_ADAPTER_DIR": str(tmp / "adapters"), "RLHF_TORCH_THREADS": "2"}
    reward_port = launch.free_port()
    results = []
    with contextlib.ExitStack() as stack:
        generation = stack.enter_context(launch.running("generation", common, tmp))
        stack.enter_context(launch.running("reward", {**common, "RLHF_REWARD_MODEL": args.reward_model}, tmp,
                                           port=reward_port))
        stub = gen_grpc.GenerationStub(grpc.insecure_channel(generation.address))
        futures = [stub.Generate.future(gen.GenerateRequest(prompt=p, params=gen.SamplingParams(
            max_new_tokens=16, temperature=1.0)), timeout=600) for p in SEED_PROMPTS]
        for f in futures:
            f.result()
        trainer_env = {**common, "RLHF_REWARD_ADDR": f"127.0.0.1:{reward_port}", "RLHF_BATCH_SIZE": str(args.batch_size),
                       "RLHF_RESPONSE_LENGTH": str(args.response_length), "RLHF_NUM_PPO_EPOCHS": str(args.num_ppo_epochs),
                       "RLHF_LEARNING_RATE": str(args.learning_rate), "RLHF_ROUND_INTERVAL_SECONDS": "0",
                       "RLHF_ROUND_MIN_FEEDBACK": "0"}
        trainer_service = stack.enter_context(launch.running("trainer", trainer_env, tmp))
        trainer = tr_grpc.TrainerStub(grpc.insecure_channel(trainer_service.address))
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            r = trainer.RunRound(tr.RunRoundRequest(), timeout=1800)
            results.append({"outcome": r.outcome, "version": r.version, "reason": r.reason,
                            "wall_seconds": time.perf_counter() - t0, "metrics": dict(r.metrics)})
    parts = ["time/rollout_seconds", "time/score_seconds", "time/update_seconds", "time/eval_seconds",
             "time/round_seconds"]
    result = {"benchmark": "ppo-round", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "reward_model": args.reward_model, "batch_size": args.batch_size,
              "response_length": args.response_length, "num_ppo_epochs": args.num_ppo_epochs,
              "learning_rate": args.learning_rate, "rounds": results}
    lines = [f"PPO round through the three services — SmolLM2-135M + LoRA r16, reward {args.reward_model!r}, batch "
             f"{args.batch_size}, {args.response_length} tokens, {args.num_ppo_epochs} epochs, lr {args.learning_rate}, "
             f"{result['machine']}, {result['date']}", "",
             "| round | outcome | held-out reward parent -> candidate | KL | rollout s | score s | update s | eval s | total s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(results, 1):
        m = r["metrics"]
        lines.append(f"| {i} | {r['outcome']} {r['version']} | {m.get('eval/reward_current', float('nan')):.4f} -> "
                     f"{m.get('eval/reward', float('nan')):.4f} | {m.get('eval/kl', float('nan')):.2f} | "
                     + " | ".join(f"{m.get(k, float('nan')):.1f}" for k in parts) + " |")
    write_report(args.out, "ppo_round", result, lines)
    return 0
