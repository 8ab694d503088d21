"""Simulated users: concurrent gRPC clients that ask for replies and rate them by a hidden preference.

Each user belongs to a persona (simulate.judges.PERSONAS). It calls Generate with a train prompt,
sometimes with n=2, then sends a thumbs rating for each candidate (SubmitFeedback) and, for a
pair, which one it prefers (SubmitPreference). With `rank_n` K those requests ask for K candidates
instead and send one ranking of all K (SubmitRanking, by Persona.rank_scores) in place of the
preference. As real users do, it may rate only a share of what it gets (`rated_fraction`): each
candidate is rated with that probability, and a pair's preference (or the ranking) is sent with
that probability too, decided once per request, independently of the ratings. The
ratings come from the judges plus noise; the system under test only ever sees the ratings. The
pool also keeps what the system never sees: the persona's noise-free verdict on every reply it
served, rated or not, per policy version (how the demo measures each version's learning).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from rlhf_online.engine.request import Limits
from rlhf_online.simulate.judges import PERSONAS, Persona
from rlhf_online.tls import ClientTLS, channel

log = logging.getLogger("rlhf_online.simulate")

MAX_RANK_N = Limits().max_n  # the Generation service's default max_n: no more candidates per request, nor per ranking


@dataclass(frozen=True)
class UserPoolConfig:
    """How many users, who they are, and how they ask."""

    users: int = 4  # concurrent clients
    personas: tuple[str, ...] = ("polite", "positive")  # assigned round-robin to users
    pair_fraction: float = 0.5  # share of requests that ask for n=2 (and may send a preference)
    rank_n: int = 0  # 0: those requests ask n=2 and prefer; K in 2..8: they ask n=K and send a ranking of all K
    rated_fraction: float = 1.0  # probability of rating each reply, and of sending a pair's preference (ranking)
    noise: float | None = None  # rating flip probability; None keeps each persona's own
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    think_seconds: float = 0.0  # pause between a user's requests
    timeout_seconds: float = 300.0  # client deadline of each Generate
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject settings the pool cannot run with, naming the field."""
        from rlhf_online.errors import ConfigError

        unknown = [p for p in self.personas if p not in PERSONAS]
        if unknown or not self.personas:
            raise ConfigError(f"personas: unknown {unknown or 'empty'}; choose from {', '.join(PERSONAS)}")
        if self.users < 1:
            raise ConfigError(f"users: invalid value {self.users} (want >= 1)")
        if not 0 <= self.pair_fraction <= 1:
            raise ConfigError(f"pair_fraction: invalid value {self.pair_fraction} (want 0..1)")
        if not 0 < self.rated_fraction <= 1:
            raise ConfigError(f"rated_fraction: invalid value {self.rated_fraction} (want 0 < F <= 1)")
        if self.noise is not None and not 0 <= self.noise <= 0.5:
            raise ConfigError(f"noise: invalid value {self.noise} (want 0..0.5)")
        if self.rank_n != 0 and not 2 <= self.rank_n <= MAX_RANK_N:
            raise ConfigError(f"rank_n: invalid value {self.rank_n} (want 0 or 2..{MAX_RANK_N})")


@dataclass
class PoolStats:
    """Running totals, safe to read from another thread."""

    requests: int = 0
    completions: int = 0  # replies received, rated or not
    thumbs_up: int = 0  # ratings sent
    thumbs_down: int = 0
    preferences: int = 0  # preferences sent
    rankings: int = 0  # rankings sent
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Ratings sent per policy version: [thumbs up, ratings]; a version only appears once a reply of it was rated.
    by_version: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # [up, rated]
    # Every reply served per policy version, rated or not: [the persona's noise-free thumbs up, replies].
    served_by_version: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    # The same per version and user: a canary serves only its share of the users, who may rate unlike the rest.
    served_by_version_user: dict[str, dict[str, list[int]]] = field(default_factory=lambda: defaultdict(dict))

    @property
    def ratings(self) -> int:
        """Ratings sent."""
        return self.thumbs_up + self.thumbs_down

    @property
    def thumbs_up_rate(self) -> float:
        """Share of ratings that were thumbs up (nan before any)."""
        return self.thumbs_up / self.ratings if self.ratings else float("nan")


class UserPool:
    """Runs `config.users` simulated users against a Generation service until stopped."""

    def __init__(self, addr: str, prompts: Sequence[str], config: UserPoolConfig,
                 events_path: Path | None = None, tls: ClientTLS | None = None) -> None:
        if not prompts:
            raise ValueError("prompts: need at least one prompt to ask")
        from rlhf_online.v1 import generation_pb2_grpc

        self.config, self.prompts = config, list(prompts)
        self.channel = channel(addr, tls)  # TLS when the service serves it (tls: its CA, and a client certificate)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._events = open(events_path, "a") if events_path else None  # noqa: SIM115 - closed in stop()
        self._threads: list[threading.Thread] = []

    def persona_of(self, user: int) -> Persona:
        """The persona of user number `user` (round-robin), with the pool's noise if set."""
        p = PERSONAS[self.config.personas[user % len(self.config.personas)]]
        if self.config.noise is None:
            return p
        return Persona(p.name, p.w_sentiment, p.w_toxicity, self.config.noise, p.threshold)

    def start(self) -> UserPool:
        """Start every user's thread."""
        for u in range(self.config.users):
            t = threading.Thread(target=self._user, args=(u,), name=f"user-{u}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def versions_rated(self) -> list[str]:
        """The policy versions whose replies users have rated so far ("" = the bare base)."""
        with self._lock:
            return sorted(self.stats.by_version)

    def stop(self, timeout: float = 60.0) -> None:
        """Let each user finish the request in hand, then return."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._events:
            self._events.close()
            self._events = None
        self.channel.close()

    def _user(self, user: int) -> None:
        rng = random.Random(self.config.seed * 1000 + user)
        persona = self.persona_of(user)
        user_id = f"{persona.name}-{user}"
        while not self._stop.is_set():
            try:
                self._one_request(user_id, persona, rng)
            except grpc.RpcError as e:
                with self._lock:
                    self.stats.errors[e.code().name] += 1
                if self._stop.is_set():
                    break
                log.warning("simulated user call failed", extra={"user": user_id, "code": e.code().name,
                                                                 "detail": e.details()})
                self._stop.wait(1.0)  # back off instead of hammering a failing server
            if self.config.think_seconds:
                self._stop.wait(self.config.think_seconds)

    def _one_request(self, user_id: str, persona: Persona, rng: random.Random) -> None:
        from rlhf_online.v1 import generation_pb2 as pb

        cfg = self.config
        n = (cfg.rank_n or 2) if rng.random() < cfg.pair_fraction else 1
        prompt = rng.choice(self.prompts)
        params = pb.SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                   seed=rng.getrandbits(48))
        r = self.stub.Generate(pb.GenerateRequest(prompt=prompt, params=params, n=n, user_id=user_id),
                               timeout=cfg.timeout_seconds)
        texts = [c.text for c in r.completions]
        # Scored once: the noisy ratings, the preference or ranking and the noise-free verdicts all come from these.
        scores = persona.preference(texts)
        rated = [i for i in range(len(texts)) if self._rates(rng)]
        ratings = persona.rate_scores([scores[i] for i in rated], rng)
        for i, rating in zip(rated, ratings, strict=True):
            self.stub.SubmitFeedback(pb.SubmitFeedbackRequest(
                completion_id=r.completions[i].completion_id, user_id=user_id,
                rating=pb.RATING_THUMBS_UP if rating == "thumbs_up" else pb.RATING_THUMBS_DOWN), timeout=30)
        compares = n > 1 and self._rates(rng)
        if compares:
            self._compare(user_id, persona, [c.completion_id for c in r.completions], scores, rng)
        verdicts: list[bool | None] = [None] * len(texts)  # each candidate's rating: up, down, or not rated
        for i, rating in zip(rated, ratings, strict=True):
            verdicts[i] = rating == "thumbs_up"
        # Per candidate: under a canary, a request's candidates may come from two versions.
        self._count(user_id, r.policy_version, [(c.policy_version, verdicts[i],
                                                  persona.thumbs_up(scores[i]))
                                                 for i, c in enumerate(r.completions)],
                    preferred=compares and not cfg.rank_n, ranked=compares and bool(cfg.rank_n))

    def _compare(self, user_id: str, persona: Persona, ids: list[str], scores: list[float],
                 rng: random.Random) -> None:
        """Send the persona's ranking of the candidates (with rank_n), else its preference between the two."""
        from rlhf_online.v1 import generation_pb2 as pb

        if self.config.rank_n:
            order = persona.rank_scores(scores, rng)
            self.stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=[ids[i] for i in order], user_id=user_id),
                                    timeout=30)
            return
        better = persona.prefer_scores(scores[0], scores[1], rng)
        self.stub.SubmitPreference(pb.SubmitPreferenceRequest(
            chosen_completion_id=ids[better], rejected_completion_id=ids[1 - better], user_id=user_id), timeout=30)

    def _rates(self, rng: random.Random) -> bool:
        """Whether the user rates this reply (or sends this preference or ranking): with probability rated_fraction."""
        # No draw at 1.0, so a pool that rates everything rolls the same dice as before the knob existed.
        return self.config.rated_fraction >= 1 or rng.random() < self.config.rated_fraction

    def _count(self, user_id: str, version: str, candidates: list[tuple[str, bool | None, bool]],
               preferred: bool, ranked: bool = False) -> None:
        """Add one answered request to the totals and the events file.

        `version` is the response's; `candidates` is, per reply, (the version that wrote it, its rating:
        True up, False down, None not rated, the persona's noise-free verdict).
        """
        ups = sum(r is True for _, r, _ in candidates)
        rated = sum(r is not None for _, r, _ in candidates)
        with self._lock:
            s = self.stats
            s.requests += 1
            s.completions += len(candidates)
            s.thumbs_up += ups
            s.thumbs_down += rated - ups
            s.preferences += preferred
            s.rankings += ranked
            for v, rating, noise_free_up in candidates:
                if rating is not None:
                    s.by_version[v][0] += rating
                    s.by_version[v][1] += 1
                s.served_by_version[v][0] += noise_free_up
                s.served_by_version[v][1] += 1
                per_user = s.served_by_version_user[v].setdefault(user_id, [0, 0])
                per_user[0] += noise_free_up
                per_user[1] += 1
            if self._events:
                self._events.write(json.dumps({
                    "t": time.time(), "user": user_id, "policy_version": version, "completions": len(candidates),
                    "versions": [v for v, _, _ in candidates], "ratings": rated, "thumbs_up": ups,
                    "preference": preferred, "ranking": ranked,
                    "noise_free_thumbs_up": sum(n for _, _, n in candidates)}) + "\n")
                self._events.flush()


def run_for(addr: str, prompts: Sequence[str], config: UserPoolConfig, seconds: float,
            events_path: Path | None = None, report_every: float = 10.0, tls: ClientTLS | None = None) -> PoolStats:
    """Run a pool for `seconds`, logging progress; returns its totals."""
    pool = UserPool(addr, prompts, config, events_path, tls).start()
    t0 = time.monotonic()
    try:
        while (left := seconds - (time.monotonic() - t0)) > 0:
            time.sleep(min(report_every, left))
            s = pool.stats
            log.info("simulated users", extra={"seconds": round(time.monotonic() - t0), "requests": s.requests,
                                               "completions": s.completions, "ratings": s.ratings,
                                               "thumbs_up_rate": round(s.thumbs_up_rate, 3),
                                               "preferences": s.preferences, "rankings": s.rankings,
                                               "errors": dict(s.errors)})
    finally:
        pool.stop()
    return pool.stats
