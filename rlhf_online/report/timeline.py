"""Watching the running loop: periodic snapshots of the three services and the users, and each round's outcome."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

log = logging.getLogger("rlhf_online.demo")


@dataclass
class Snapshot:
    """The loop at one moment."""

    t: float  # seconds since the demo started
    requests: int
    completions: int
    feedback: int  # thumbs sent so far
    preferences: int
    thumbs_up_rate: float  # all ratings so far
    recent_thumbs_up_rate: float  # ratings since the previous snapshot
    policy_version: str  # served by the generation service
    reward_version: str
    reward_accuracy: float  # the served reward model's held-out pairwise accuracy (nan before one)
    reward_feedback_seen: int
    rounds_published: int
    rounds_rejected: int
    errors: int
    canary_version: str = ""  # served to a share of the users while its ratings are judged ("" = none)
    rankings: int = 0  # rankings sent so far (users with rank_n)


@dataclass
class RoundRecord:
    """One finished round, as the trainer reported it."""

    t: float
    outcome: str
    version: str
    reason: str
    kl: float  # held-out KL of the candidate to the reference
    reward_before: float  # held-out reward of the serving policy, by the reward model of the round
    reward_after: float  # same prompts and seeds, the candidate
    seconds: float
    kl_se: float = float("nan")  # the standard error of `kl` (nan where the trainer gave none)
    kl_coef: float = float("nan")  # beta of the round's last update (the budget's pressure included)


class Monitor:
    """Polls the services and the user pool; keeps snapshots and rounds, appending both to JSONL files."""

    def __init__(self, gen_addr: str, reward_addr: str, trainer_addr: str, pool, out_dir: Path) -> None:
        from rlhf_online.v1 import generation_pb2_grpc, reward_pb2_grpc, trainer_pb2_grpc

        self.gen = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gen_addr))
        self.reward = reward_pb2_grpc.RewardStub(grpc.insecure_channel(reward_addr))
        self.trainer = trainer_pb2_grpc.TrainerStub(grpc.insecure_channel(trainer_addr))
        self.pool = pool
        self.t0 = time.time()
        self.snapshots: list[Snapshot] = []
        self.rounds: list[RoundRecord] = []
        self._rounds_seen = 0
        self._last_ratings = (0, 0)  # (up, rated) at the previous snapshot
        self._snap_file = out_dir / "timeline.jsonl"
        self._round_file = out_dir / "rounds.jsonl"

    def poll(self) -> Snapshot:
        """Take a snapshot (and record any round finished since the last poll)."""
        from rlhf_online.v1 import generation_pb2, reward_pb2, trainer_pb2

        now = time.time() - self.t0
        t = [time.perf_counter()]
        policy = self.gen.GetPolicy(generation_pb2.GetPolicyRequest(), timeout=30)
        t.append(time.perf_counter())
        info = self.reward.GetRewardModel(reward_pb2.GetRewardModelRequest(), timeout=30)
        t.append(time.perf_counter())
        status = self.trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30)
        t.append(time.perf_counter())
        log.debug("poll", extra={"seconds": [round(b - a, 3) for a, b in zip(t, t[1:], strict=False)]})
        if status.rounds_total > self._rounds_seen:
            self._rounds_seen = status.rounds_total
            r = status.last_round
            if r.outcome in ("published", "rejected"):
                m = r.metrics
                rec = RoundRecord(now, r.outcome, r.version, r.reason, m.get("eval/kl", float("nan")),
                                  m.get("eval/reward_current", float("nan")), m.get("eval/reward", float("nan")),
                                  m.get("time/round_seconds", float("nan")), m.get("eval/kl_se", float("nan")),
                                  m.get("objective/kl_coef", float("nan")))
                self.rounds.append(rec)
                _append(self._round_file, asdict(rec))
        s = self.pool.stats
        up, rated = s.thumbs_up, s.thumbs_up + s.thumbs_down
        d_up, d_rated = up - self._last_ratings[0], rated - self._last_ratings[1]
        self._last_ratings = (up, rated)
        snap = Snapshot(
            t=now, requests=s.requests, completions=s.completions, feedback=rated, preferences=s.preferences,
            thumbs_up_rate=s.thumbs_up_rate, recent_thumbs_up_rate=d_up / d_rated if d_rated else float("nan"),
            policy_version=policy.version, reward_version=info.version,
            reward_accuracy=info.metrics.get("pairwise_accuracy", float("nan")),
            reward_feedback_seen=info.feedback_seen,
            rounds_published=sum(r.outcome == "published" for r in self.rounds),
            rounds_rejected=sum(r.outcome == "rejected" for r in self.rounds), errors=sum(s.errors.values()),
            canary_version=policy.canary_version, rankings=s.rankings)
        self.snapshots.append(snap)
        _append(self._snap_file, asdict(snap))
        return snap

    def line(self, snap: Snapshot) -> str:
        """One progress line for the terminal."""
        last = self.rounds[-1] if self.rounds else None
        kl = f"KL {last.kl:.2f}" if last else "KL -"
        acc = f"acc {snap.reward_accuracy:.2f}" if snap.reward_version else "untrained"
        return (f"[{int(snap.t) // 60:2d}:{int(snap.t) % 60:02d}] requests {snap.requests:4d} | thumbs {snap.feedback:4d} "
                f"up {_pct(snap.thumbs_up_rate)} (recent {_pct(snap.recent_thumbs_up_rate)}) | "
                f"reward {snap.reward_version or '-'} {acc} | policy {snap.policy_version or 'base'}"
                + (f" + canary {snap.canary_version}" if snap.canary_version else "") + " | rounds "
                f"{snap.rounds_published} published, {snap.rounds_rejected} rejected | {kl}"
                + (f" | errors {snap.errors}" if snap.errors else ""))


def _pct(x: float) -> str:
    return "  - " if x != x else f"{100 * x:3.0f}%"


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
