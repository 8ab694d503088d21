"""`rlhf-online bench poisoning`: can one user who floods the API with opposite feedback steer the reward model?

Honest simulated users (the demo's "polite" preference, rating noise 10%) ask a generation service
for n=2 replies to train prompts and rate both and pick one, through the public gRPC API with an
API key of their tenant (`--require-api-key`: each rates only what it was served). Then one
attacker, with a key of its own tenant, asks `--attack-factor` times as many requests as one honest
user and rates every reply with the opposite preference. The reward model trains three times in
one run — on the honest feedback alone, on everything without the per-user cap, and on everything
with the cap (`max_user_share`, the reward service's default) — and each is scored, as in `bench
reward-accuracy`, on every pair of 4 replies to each held-out prompt against the honest users'
noise-free preference, with a 95% bootstrap interval over prompts.

The service runs with no feedback rate limit, so that the attacker's whole volume reaches the
store: this measures the cap alone (a rate limit would only slow the attacker down).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rlhf_online import launch
from rlhf_online.bench.common import machine, write_report
from rlhf_online.bench.reward_accuracy import add_generation_arguments, cached_replies, measure


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the poisoning measurement."""
    p.add_argument("--users", type=int, default=24, help="honest simulated users")
    p.add_argument("--requests-per-user", type=int, default=16, help="n=2 requests each honest user asks and rates")
    p.add_argument("--attack-factor", type=float, default=10.0,
                   help="the attacker asks and rates this many times one honest user's requests")
    p.add_argument("--persona", default="polite")
    p.add_argument("--heldout-prompts", type=int, default=0, help="0 = all held-out prompts")
    p.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight at once (0 = one per honest user, 8 for the attacker); 1 makes a run "
                        "repeatable: batches of another composition shift sampling slightly")
    add_generation_arguments(p)  # sampling, model, the held-out replies' cache, --out: as bench reward-accuracy


def main(args: argparse.Namespace) -> int:
    """Honest phase, snapshot, attack phase; train and score the three arms; write JSON and Markdown."""
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.reward.training import TrainConfig
    from rlhf_online.simulate.judges import PERSONAS

    if args.users < 1 or args.requests_per_user < 1 or args.attack_factor <= 0:
        raise SystemExit("--users and --requests-per-user must be >= 1, --attack-factor > 0")
    persona = PERSONAS[args.persona]
    train = [p.prompt for p in load_prompts("train")]
    heldout = [p.prompt for p in load_prompts("heldout")][: args.heldout_prompts or None]
    t0 = time.time()
    print(f"generating {args.heldout_replies} replies for each of {len(heldout)} held-out prompts", flush=True)
    heldout_replies = cached_replies(args, heldout, [args.heldout_replies] * len(heldout))
    hidden = [persona.preference(texts) for texts in heldout_replies]
    tmp = Path(tempfile.mkdtemp(prefix="bench-poisoning-"))
    counts = feedback_through_the_api(args, persona, train, tmp)
    cap = TrainConfig().max_user_share
    arms = (("honest users only", tmp / "honest.db", {}),
            ("with the attacker, no cap", tmp / "attacked.db", {"max_user_share": 1.0}),
            (f"with the attacker, cap {cap:g}", tmp / "attacked.db", {}))
    results = []
    for k, (name, db, overrides) in enumerate(arms):
        from rlhf_online.store import open_store

        with open_store(f"sqlite:///{db}") as store:
            r = measure((name, 3, overrides), tmp / f"reward_models_{k}", store, heldout, heldout_replies, hidden,
                        args.seed)
        results.append(r)
        print(row(r), flush=True)
    clean, capped = results[0]["pairwise_accuracy"], results[2]["pairwise_accuracy"]
    result = {"benchmark": "poisoning", "persona": persona.name, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "users": args.users,
              "requests_per_user": args.requests_per_user, "attack_factor": args.attack_factor,
              "max_user_share": cap, **counts, "heldout_prompts": len(heldout), "arms": results,
              "capped_minus_clean": capped - clean, "target_within": 0.03,
              "target_met": abs(capped - clean) <= 0.03, "wall_seconds": round(time.time() - t0, 1)}
    write_report(args.out, "poisoning", result, table(result))
    return 0


def feedback_through_the_api(args: argparse.Namespace, persona: Any, prompts: list[str], tmp: Path) -> dict[str, int]:
    """Run the honest users, snapshot the store to honest.db, run the attacker; the store ends as attacked.db."""
    from rlhf_online.auth.keys import create_key
    from rlhf_online.simulate.judges import Persona
    from rlhf_online.store import open_store

    db = tmp / "attacked.db"
    with open_store(f"sqlite:///{db}") as store:  # migrated here, so the keys exist before the service starts
        honest_key, attacker_key = create_key(store, "app")[1], create_key(store, "attacker")[1]
    env = {"RLHF_BASE_MODEL": args.base_model, "RLHF_DATA_DIR": str(Path(args.data_dir).resolve()),
           "RLHF_STORE_URL": f"sqlite:///{db}", "RLHF_ADAPTER_DIR": str(tmp / "adapters"),
           "RLHF_REQUIRE_API_KEY": "true", "RLHF_FEEDBACK_RATE_PER_USER": "0", "RLHF_MAX_BATCH_SIZE": "16",
           "RLHF_MAX_QUEUE": "256"}
    # The attacker's preference is the honest one negated: thumbs up exactly where an honest user says down.
    anti = Persona(f"anti-{persona.name}", -persona.w_sentiment, -persona.w_toxicity, persona.noise, -persona.threshold)
    attacker_requests = round(args.attack_factor * args.requests_per_user)
    with launch.running("generation", env, tmp) as service:
        client = Client(service.address, args)
        rng = random.Random(args.seed)
        order = rng.sample(prompts, len(prompts))
        jobs = [(f"honest-{u}", honest_key, persona, order[(u * args.requests_per_user + i) % len(order)])
                for u in range(args.users) for i in range(args.requests_per_user)]
        print(f"{args.users} honest users: {len(jobs)} requests", flush=True)
        client.run(jobs, workers=args.concurrency or args.users)
        with sqlite3.connect(db) as src, sqlite3.connect(tmp / "honest.db") as dst:
            src.backup(dst)  # the honest phase's store, consistent: nothing is in flight between the phases
        attack = [("attacker", attacker_key, anti, rng.choice(prompts)) for _ in range(attacker_requests)]
        print(f"one attacker: {len(attack)} requests", flush=True)
        client.run(attack, workers=args.concurrency or 8)  # one user, several connections: as fast as answered
        client.close()
    return {"honest_requests": len(jobs), "attacker_requests": len(attack), "honest_ratings": client.ratings["app"],
            "attacker_ratings": client.ratings["attacker"]}


class Client:
    """Generate n=2 through the API with a key, rate both replies and pick one, by a persona."""

    def __init__(self, addr: str, args: argparse.Namespace) -> None:
        import grpc

        from rlhf_online.v1 import generation_pb2_grpc

        self.args = args
        self.channel = grpc.insecure_channel(addr)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.ratings = {"app": 0, "attacker": 0}  # thumbs and preferences sent, by tenant
        self.lock = threading.Lock()
        self.jobs_run = 0  # across both phases: each request's seed is its job's position, not its thread's turn

    def run(self, jobs: list[tuple[str, str, Any, str]], workers: int) -> None:
        """Every (user, key, persona, prompt) job once, `workers` at a time; progress every 50."""
        with ThreadPoolExecutor(workers) as pool:
            first, self.jobs_run = self.jobs_run, self.jobs_run + len(jobs)
            seeds = [self.args.seed * 1_000_000 + first + i for i in range(len(jobs))]
            for done, _ in enumerate(pool.map(lambda job, seed: self.one(*job, seed), jobs, seeds), 1):
                if done % 50 == 0:
                    print(f"  {done}/{len(jobs)} requests rated", flush=True)

    def one(self, user: str, key: str, persona: Any, prompt: str, seed: int) -> None:
        """One request, two thumbs and one preference (raises on any refused call: the run is void)."""
        from rlhf_online.v1 import generation_pb2 as pb

        md = [("x-api-key", key)]
        r = self.stub.Generate(pb.GenerateRequest(prompt=prompt, n=2, user_id=user, params=pb.SamplingParams(
            max_new_tokens=self.args.max_new_tokens, temperature=self.args.temperature, seed=seed)),
            metadata=md, timeout=600)
        a, b = r.completions
        rng = random.Random(seed)
        scores = persona.preference([a.text, b.text])
        for c, rating in zip((a, b), persona.rate_scores(scores, rng), strict=True):
            self.stub.SubmitFeedback(pb.SubmitFeedbackRequest(
                completion_id=c.completion_id, user_id=user,
                rating=pb.RATING_THUMBS_UP if rating == "thumbs_up" else pb.RATING_THUMBS_DOWN), metadata=md, timeout=60)
        better = persona.prefer_scores(scores[0], scores[1], rng)
        chosen, rejected = (a, b) if better == 0 else (b, a)
        self.stub.SubmitPreference(pb.SubmitPreferenceRequest(chosen_completion_id=chosen.completion_id,
                                                              rejected_completion_id=rejected.completion_id,
                                                              user_id=user), metadata=md, timeout=60)
        with self.lock:
            self.ratings["attacker" if user == "attacker" else "app"] += 3

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


def row(r: dict[str, Any]) -> str:
    """One arm's line of the Markdown table."""
    lo, hi = r["ci95"]
    m = r["train_metrics"]
    return (f"| {r['reward']} | {r['pairwise_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {r['heldout_pairs']} | "
            f"{m.get('users', 0):.0f} | {m.get('largest_user_share', float('nan')):.3f} | "
            f"{m.get('largest_user_share_capped', float('nan')):.3f} |")


def table(result: dict[str, Any]) -> list[str]:
    """The Markdown report."""
    clean, capped = result["arms"][0]["pairwise_accuracy"], result["arms"][2]["pairwise_accuracy"]
    return [f"Reward poisoning by one user — persona {result['persona']!r}, {result['machine']}, {result['date']}", "",
            "| reward model trained on | held-out pairwise accuracy vs the honest preference [95% CI] | pairs | "
            "users | largest user's share | after the cap |",
            "|---|---:|---:|---:|---:|---:|", *map(row, result["arms"]), "",
            f"{result['users']} honest users × {result['requests_per_user']} n=2 requests "
            f"({result['honest_ratings']} thumbs and preferences); one attacker: {result['attacker_requests']} requests "
            f"({result['attack_factor']:g}× one honest user; {result['attacker_ratings']} ratings, the opposite "
            "preference), all through the gRPC API with API keys. Capped minus honest-only accuracy: "
            f"{capped - clean:+.3f} (target: within ±{result['target_within']}; "
            f"{'met' if result['target_met'] else 'NOT met'}). Wall time {result['wall_seconds']:.0f} s."]
