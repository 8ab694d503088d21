"""`rlhf-online bench ppo-round`: rounds from the log vs rounds of own rollouts, through the three services.

Generation, Reward (a scripted reward: VADER sentiment by default) and two Trainers run as real
processes on loopback over one store. Users' traffic is sent through Generate (temperature 1,
`--traffic` replies of `--response-length` tokens); then the "log" trainer (learn_from_traffic on,
the registry the generation service serves) and the "own" trainer (learn_from_traffic off, a
registry of its own) each run `--rounds` RunRounds, fresh traffic of the newly served version
before each of the log trainer's rounds. Samples per round, seconds per round and the time split
of both are written side by side as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf_online import launch
from rlhf_online.bench.common import machine, wait_until_served, write_report

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
    p.add_argument("--rounds", type=int, default=1, help="rounds of each trainer")
    p.add_argument("--traffic", type=int, default=160, help="replies users ask for before each round from the log")
    p.add_argument("--logged-batch-size", type=int, default=128)
    p.add_argument("--num-mini-batches", type=int, default=4)
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="bench-results")


def main(args: argparse.Namespace) -> int:
    """Start the services, send traffic, run rounds of both trainers, report."""
    from rlhf_online.models.provision import resolve_base_model

    model = str(resolve_base_model(args.base_model, Path(args.data_dir)))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-round-"))
    common = {"RLHF_BASE_MODEL": model, "RLHF_DATA_DIR": str(tmp), "RLHF_STORE_URL": f"sqlite:///{tmp / 'store.db'}",
              "RLHF_ADAPTER_DIR": str(tmp / "adapters-log"), "RLHF_TORCH_THREADS": "2",
              "RLHF_ADAPTER_POLL_SECONDS": "0.5"}
    reward_port = launch.free_port()
    results: dict[str, list[dict]] = {"log": [], "own": []}
    with contextlib.ExitStack() as stack:
        generation = stack.enter_context(launch.running("generation", common, tmp))
        stack.enter_context(launch.running("reward", {**common, "RLHF_REWARD_MODEL": args.reward_model}, tmp,
                                           port=reward_port))
        users = _Users(generation.address, args.response_length)
        users.ask(len(SEED_PROMPTS), "")  # every prompt logged once, so the own-rollout trainer has prompts
        trainer_env = {**common, "RLHF_REWARD_ADDR": f"127.0.0.1:{reward_port}", "RLHF_BATCH_SIZE": str(args.batch_size),
                       "RLHF_RESPONSE_LENGTH": str(args.response_length), "RLHF_NUM_PPO_EPOCHS": str(args.num_ppo_epochs),
                       "RLHF_LEARNING_RATE": str(args.learning_rate), "RLHF_ROUND_INTERVAL_SECONDS": "0",
                       "RLHF_ROUND_MIN_FEEDBACK": "0", "RLHF_ROUND_MIN_TRAFFIC": "0",
                       "RLHF_LOGGED_BATCH_SIZE": str(args.logged_batch_size),
                       "RLHF_NUM_MINI_BATCHES": str(args.num_mini_batches), "RLHF_LEARN_FROM_TRAFFIC": "true"}
        for mode in ("own", "log"):
            env = trainer_env if mode == "log" else {**trainer_env, "RLHF_LEARN_FROM_TRAFFIC": "false",
                                                     "RLHF_ADAPTER_DIR": str(tmp / "adapters-own")}
            with launch.running("trainer", env, tmp) as service:
                for _ in range(args.rounds):
                    if mode == "log":
                        users.ask(args.traffic, _served(service.address))
                    results[mode].append(_round(service.address))
    result = {"benchmark": "ppo-round", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "reward_model": args.reward_model, "batch_size": args.batch_size, "traffic": args.traffic,
              "logged_batch_size": args.logged_batch_size, "num_mini_batches": args.num_mini_batches,
              "response_length": args.response_length, "num_ppo_epochs": args.num_ppo_epochs,
              "learning_rate": args.learning_rate, "rounds": results}
    write_report(args.out, "ppo_round", result, _table(args, result))
    return 0


class _Users:
    """Clients that ask the generation service for replies at temperature 1 (on-policy traffic) and wait for them."""

    def __init__(self, address: str, max_new_tokens: int) -> None:
        import grpc

        from rlhf_online.v1 import generation_pb2_grpc as gen_grpc

        self.stub = gen_grpc.GenerationStub(grpc.insecure_channel(address))
        self.max_new_tokens = max_new_tokens

    def ask(self, replies: int, version: str) -> None:
        """`replies` replies (prompts in turn), once the generation service serves `version`."""
        from rlhf_online.v1 import generation_pb2 as gen

        wait_until_served(self.stub, version, 60)
        params = gen.SamplingParams(max_new_tokens=self.max_new_tokens, temperature=1.0)

        def one(i: int) -> None:
            self.stub.Generate(gen.GenerateRequest(prompt=SEED_PROMPTS[i % len(SEED_PROMPTS)], params=params),
                               timeout=1200)

        # 16 clients at a time, as users are: the service's queue (64 by default) refuses a flood.
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(replies)))


def _served(trainer_address: str) -> str:
    """The version the trainer's registry names CURRENT (what the generation service should serve)."""
    import grpc

    from rlhf_online.v1 import trainer_pb2 as tr
    from rlhf_online.v1 import trainer_pb2_grpc as tr_grpc

    return tr_grpc.TrainerStub(grpc.insecure_channel(trainer_address)).GetStatus(tr.GetStatusRequest(), timeout=30).current


def _round(trainer_address: str) -> dict:
    """One RunRound, timed from the outside."""
    import grpc

    from rlhf_online.v1 import trainer_pb2 as tr
    from rlhf_online.v1 import trainer_pb2_grpc as tr_grpc

    t0 = time.perf_counter()
    r = tr_grpc.TrainerStub(grpc.insecure_channel(trainer_address)).RunRound(tr.RunRoundRequest(), timeout=1800)
    return {"outcome": r.outcome, "version": r.version, "reason": r.reason, "wall_seconds": time.perf_counter() - t0,
            "metrics": dict(r.metrics)}


def _table(args: argparse.Namespace, result: dict) -> list[str]:
    """The Markdown lines of the report: one row per round of each trainer."""
    parts = ["time/read_log_seconds", "time/rollout_seconds", "time/forward_seconds", "time/score_seconds",
             "time/update_seconds", "time/eval_seconds", "time/round_seconds"]
    lines = [f"PPO rounds through the three services — SmolLM2-135M + LoRA r16, reward {args.reward_model!r}, "
             f"{args.response_length}-token replies, {args.num_ppo_epochs} epochs x {args.num_mini_batches} minibatches, "
             f"lr {args.learning_rate}; own rollouts: batch {args.batch_size}; from the log: up to "
             f"{args.logged_batch_size} of {args.traffic} replies served; {result['machine']}, {result['date']}", "",
             "| trainer | round | outcome | samples (logged + own) | gate | held-out reward parent -> candidate | KL | "
             "read s | rollout s | forward s | score s | update s | eval s | total s | samples/s |",
             "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("log", "own"):
        for i, r in enumerate(result["rounds"][mode], 1):
            m = r["metrics"]
            n_logged, n_own = int(m.get("samples/logged", 0)), int(m.get("samples/own", 0))
            seconds = m.get("time/round_seconds", float("nan"))
            lines.append(f"| {mode} | {i} | {r['outcome']} {r['version']} | {n_logged + n_own} ({n_logged} + {n_own}) | "
                         f"{'traffic' if m.get('eval/on_traffic') else 'sampled'} | "
                         f"{m.get('eval/reward_current', float('nan')):.4f} -> {m.get('eval/reward', float('nan')):.4f} | "
                         f"{m.get('eval/kl', float('nan')):.2f} | "
                         + " | ".join(f"{m.get(k, float('nan')):.1f}" for k in parts)
                         + f" | {(n_logged + n_own) / seconds:.2f} |")
    return lines
