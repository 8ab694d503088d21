"""`bench store-growth`: does a round's store time grow with the history? Trainer and reward retraining at 10k..1M.

For each size N (default 10k, 100k, 1M logged completions, --rated of them rated) a fresh SQLite
store is filled with synthetic traffic: two replies per prompt, served by versions v000001..v000100,
each rated reply thumbed, one in three pairs also a preference. Then --rounds rounds each log one
round's new traffic (--new-per-round completions of the served version, rated alike) and time the
store work of:

- the trainer's round: its prompts (`split_prompts`, the newest --prompt-window completions), its
  logged batch (`logged.read`, the served version's newest completions by index) and the users'
  ratings of that batch (`rating_evidence`), with the defaults of PPOConfig / TrainerConfig;
- a reward retraining: the feedback window's refresh (reward.window: the rows committed since the
  last refresh and the completions they rate; the window was loaded once before the first round,
  timed as `window_load_seconds`). The in-memory dataset build on the window is timed beside it
  (`dataset_seconds`): CPU, not store, and bounded by the window.

Beside them, in the same run, the reads the code made before (the baseline): every distinct prompt
of the history, and every rating with every completion it rates. `growth_ratio` = median time at the
largest size / at the smallest; the target is <= 2 for the trainer and the reward retraining.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_online.bench.common import machine, write_report
from rlhf_online.data.split import HELDOUT_PERCENT
from rlhf_online.ppo import logged
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.trainer import split_prompts
from rlhf_online.reward.training import TrainConfig, build_dataset
from rlhf_online.reward.window import FeedbackWindow
from rlhf_online.store import CompletionRecord, Store, open_store

VERSIONS = 100  # the history was served by this many versions; the last one is serving now
USERS = 50
FILL_BATCH = 5000  # completions (and their ratings) per transaction while filling


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the benchmark."""
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated logged completions per store")
    p.add_argument("--rated", type=float, default=0.3, help="share of completions rated")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per size (medians reported)")
    p.add_argument("--baseline-rounds", type=int, default=3, help="timed rounds of the full-history reads per size")
    p.add_argument("--new-per-round", type=int, default=256, help="completions logged between two rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="", help="where the stores are built (default: a temporary directory)")
    p.add_argument("--out", default="bench-results")


class Traffic:
    """Synthetic logged completions and ratings, appended to a store in bulk."""

    def __init__(self, store: Store, rated: float, rng: random.Random, history: int) -> None:
        self.store, self.rated, self.rng = store, rated, rng
        self.history = history  # the first `history` completions are spread over versions 1..VERSIONS
        self.count, self.clock = 0, 1.0e9

    def log(self, n: int, version: str | None = None) -> None:
        """n more completions (two per prompt), a `rated` share of them rated, in transactions of FILL_BATCH."""
        for start in range(0, n, FILL_BATCH):
            records = []
            for _ in range(min(FILL_BATCH, n - start)):
                i = self.count
                self.count += 1
                self.clock += 0.01
                v = version or f"v{1 + i * VERSIONS // self.history:06d}"
                records.append(CompletionRecord(
                    completion_id=f"c{i:08d}", prompt=f"prompt {i // 2}: tell me about {i % 97}", messages=(),
                    text=f"reply {i}", policy_version=v, user_id=f"u{i % USERS}", created_at=self.clock,
                    params={"temperature": 1.0}, prompt_token_ids=(1, 2, 3, 4), token_ids=(5, 6, 7), finish_reason="eos"))
            self.store.add_completions(records)
            self._rate([r.completion_id for r in records])

    def _rate(self, ids: list[str]) -> None:
        """Thumbs on a `rated` share; a preference for one in three rated pairs (bulk: bench only)."""
        thumbs, prefs = [], []
        for k in range(0, len(ids) - 1, 2):
            a, b = ids[k], ids[k + 1]
            for cid in (a, b):
                if self.rng.random() < self.rated:
                    thumbs.append((cid, f"u{self.rng.randrange(USERS)}", self.rng.choice(("thumbs_up", "thumbs_down")),
                                   "", self.clock))
            if self.rng.random() < self.rated / 3:
                prefs.append((a, b, f"u{self.rng.randrange(USERS)}", self.clock))
        # One statement per table per batch instead of one transaction per rating: the ratings are not
        # what is measured, and filling 300k of them through add_feedback would take most of the run.
        with self.store._transaction() as cur:  # noqa: SLF001
            cur.executemany(self.store.dialect.sql(
                "INSERT INTO feedback (completion_id, user_id, rating, comment, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING"), thumbs)
            cur.executemany(self.store.dialect.sql(
                "INSERT INTO preferences (chosen_id, rejected_id, user_id, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING"), prefs)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call took."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_size(size: int, args: argparse.Namespace, work: Path) -> dict:
    """Fill a store with `size` completions, then time --rounds rounds of each job's store work."""
    path = work / f"store-{size}.db"
    path.unlink(missing_ok=True)
    store = open_store(f"sqlite:///{path}")
    traffic = Traffic(store, args.rated, random.Random(args.seed), history=size)
    t0 = time.time()
    traffic.log(size)
    fill = time.time() - t0
    print(f"  {size:,} completions logged in {fill:.0f} s", flush=True)
    ppo, cfg, reward_cfg = PPOConfig(), TrainerConfig(), TrainConfig()
    serving = f"v{VERSIONS:06d}"
    window = FeedbackWindow(store, reward_cfg.window_examples)
    window_load = timed(window.refresh)

    def trainer_round() -> None:
        split_prompts(store, HELDOUT_PERCENT, cfg.prompt_window)
        batch = logged.read(store, serving, ppo, cfg, HELDOUT_PERCENT)
        store.rating_evidence([s.completion_id for s in batch.train])

    def baseline_trainer() -> None:  # every distinct prompt of the history (the trainer's read before)
        store.recent_prompts(size + traffic.count)

    def baseline_reward() -> None:  # every rating and every completion it rates (build_dataset's reads before)
        rows = (store.list_feedback(), store.list_preferences(), store.list_rankings())
        ids = {f.completion_id for f in rows[0]} | {c for r in rows[2] for c in r.completion_ids} | \
            {c for p in rows[1] for c in (p.chosen_completion_id, p.rejected_completion_id)}
        store.get_completions(ids)

    times: dict[str, list[float]] = {k: [] for k in ("trainer", "reward", "dataset", "baseline_trainer",
                                                     "baseline_reward")}
    for r in range(args.rounds):
        traffic.log(args.new_per_round, version=serving)
        times["trainer"].append(timed(trainer_round))
        times["reward"].append(timed(window.refresh))
        times["dataset"].append(timed(lambda: build_dataset(store, reward_cfg, window)))
        if r < args.baseline_rounds:
            times["baseline_trainer"].append(timed(baseline_trainer))
            times["baseline_reward"].append(timed(baseline_reward))
    ratings = store.count_feedback() + store.count_preferences()
    store.close()
    path.unlink(missing_ok=True)
    return {"completions": size, "ratings": ratings,
            "fill_seconds": round(fill, 1), "window_load_seconds": round(window_load, 4),
            **{f"{k}_seconds": round(statistics.median(v), 5) for k, v in times.items() if v}}


def main(args: argparse.Namespace) -> int:
    """Every size, then store_growth.json and store_growth.md."""
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if not sizes or sizes[0] < 2 * args.new_per_round or args.rounds < 1 or not 0 < args.rated <= 1:
        raise SystemExit("--sizes must be at least twice --new-per-round, --rounds >= 1, --rated in (0, 1]")
    with tempfile.TemporaryDirectory(dir=args.work_dir or None) as tmp:
        rows = [one_size(n, args, Path(tmp)) for n in sizes]
    lo, hi = rows[0], rows[-1]

    def growth(key: str) -> float:
        return round(hi[key] / lo[key], 2) if lo.get(key) and hi.get(key) else math.nan

    result = {"benchmark": "store-growth", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "backend": "sqlite", "rated": args.rated, "rounds": args.rounds, "new_per_round": args.new_per_round,
              "prompt_window": TrainerConfig().prompt_window, "window_examples": TrainConfig().window_examples,
              "sizes": rows,
              "growth_ratio": {"trainer": growth("trainer_seconds"), "reward": growth("reward_seconds"),
                               "dataset": growth("dataset_seconds"),
                               "baseline_trainer": growth("baseline_trainer_seconds"),
                               "baseline_reward": growth("baseline_reward_seconds")}}
    g = result["growth_ratio"]
    ms = lambda x: f"{1000 * x:.1f}" if x is not None else "-"  # noqa: E731
    lines = [f"# store growth ({result['date']}, {result['machine']}, SQLite, {100 * args.rated:.0f}% rated, "
             f"median of {args.rounds} rounds, {args.new_per_round} new completions per round)", "",
             "| logged completions | trainer round, ms | reward refresh, ms | dataset build, ms "
             "| before: trainer prompts, ms | before: reward reads, ms | window load, ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['completions']:,} | {ms(r['trainer_seconds'])} | {ms(r['reward_seconds'])} | "
              f"{ms(r['dataset_seconds'])} | {ms(r.get('baseline_trainer_seconds'))} | "
              f"{ms(r.get('baseline_reward_seconds'))} | {ms(r['window_load_seconds'])} |" for r in rows]
    lines += ["", f"growth_ratio ({hi['completions']:,} / {lo['completions']:,}): trainer {g['trainer']}, "
                  f"reward {g['reward']} (target <= 2); dataset build {g['dataset']}; "
                  f"before: trainer {g['baseline_trainer']}, reward {g['baseline_reward']}"]
    write_report(args.out, "store_growth", result, lines)
    return 0
