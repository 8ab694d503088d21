"""The promotion controller: a published candidate becomes the canary, and its users' feedback decides.

Every `poll_seconds` (and right after each publish) the controller in the Trainer service:
1. reconciles what an operator did by hand (`policies promote|rollback`, ActivatePolicy),
2. with no canary live, makes the newest queued candidate the canary (older queued ones are
   superseded: the newest descends from them and carries their updates) once it is
   `canary_min_rounds` rounds past CURRENT or has been the newest for `canary_queue_timeout_seconds`,
3. with a canary live, reads the users' thumbs on the canary's and the stable version's replies
   since it went live (with canary_same_users, the stable replies of the canary's own users only)
   and their preferences between the two (store.compare_versions), adds the
   learned-reward gain the trainer's gate measured along its lineage, and asks the sequential test
   (canary.sequential.decide): promote (CURRENT := CANARY), roll back (CANARY := ""), or keep
   collecting — until `canary_timeout_seconds`, when it rolls back, or, with `canary_max_looks`,
   until that many judged completions, when the test's lean decides (sequential.lean_promotes).
   With `canary_replace_after`, a canary still undecided after that many judged completions and
   leaning to "not better" (llr <= 0) is superseded by the newest candidate trained from it, which
   starts its own test. Queued candidates trained on top of a rolled-back canary are discarded when the users found it worse beyond noise; after a
   canary merely not shown better, the newest of them, with more rounds of training in it, goes
   live next and is judged on its own.
Each decision is written to the candidate's record (registry decisions/<version>.json) with its
evidence, logged and counted. The controller keeps no state of its own: a restarted trainer picks
up where the records and pointers say it stands.

The trainer does not wait for decisions: it warm-starts each round from `head(registry)`, the
newest queued candidate, else the canary, else CURRENT, so learning continues on top of the
canary while users judge it; if the canary is rolled back as worse, the rounds built on it are
discarded with it and training restarts from CURRENT.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from rlhf_online import metrics
from rlhf_online.adapters.registry import (
    DISCARDED,
    LIVE,
    PROMOTED,
    QUEUED,
    ROLLED_BACK,
    SUPERSEDED,
    AdapterRegistry,
)
from rlhf_online.artifacts import json_safe
from rlhf_online.canary.config import CanaryConfig
from rlhf_online.canary.sequential import (
    CanaryTestConfig,
    Decision,
    Evidence,
    canary_looks,
    decide,
    lean_promotes,
)
from rlhf_online.errors import InvalidArgument, NotFound
from rlhf_online.store import Store

log = logging.getLogger("rlhf_online.canary")
EVIDENCE_KINDS = ("canary_rated", "stable_rated", "pairs", "delta", "llr")
MIN_SAME_USER_STABLE_RATINGS = 10  # fewer stable ratings from the canary's own users: compare with everyone's


def head(registry: AdapterRegistry) -> str:
    """The version the next round warm-starts from: the newest queued candidate, else the canary, else CURRENT."""
    queued = registry.with_outcome(QUEUED)
    return queued[-1] if queued else registry.canary() or registry.current()


class CanaryController:
    """Moves candidates through queued -> live -> promoted | rolled back, on the users' evidence."""

    def __init__(self, config: CanaryConfig, test: CanaryTestConfig, registry: AdapterRegistry, store: Store,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.test, self.registry, self.store, self.clock = config, test, registry, store, clock
        self.last: Decision | None = None  # the latest test result on the live canary
        self._lock = threading.Lock()  # one step at a time (the poll thread and the publisher both step)
        self._stop = threading.Event()

    def queue(self, version: str) -> None:
        """A freshly published candidate waits for its turn as the canary."""
        self.registry.record(version, {"outcome": QUEUED, "queued_at": self.clock()})
        log.info("candidate queued for canary", extra={"version": version})

    def activate(self, version: str) -> dict | None:
        """An operator's ActivatePolicy: CURRENT := version, then a step, under the lock so no step promotes over it."""
        with self._lock:
            self.registry.activate(version)
            return self._step()

    def step(self) -> dict | None:
        """One look: reconcile, start a canary, or test the live one; returns a decision record when one was made."""
        with self._lock:
            return self._step()

    def _step(self) -> dict | None:
        self._reconcile()
        canary = self.registry.canary()
        if not canary:
            self._start_next()
            if not self.registry.canary():
                for kind in EVIDENCE_KINDS:  # nothing live: the dashboard shows no stale evidence
                    metrics.CANARY_EVIDENCE.labels(kind).set(0)
            return None
        record = self.registry.decision(canary) or {}
        if record.get("outcome") != LIVE:  # CANARY set by hand, or a crash before its record was written
            record = self.registry.record(canary, {"outcome": LIVE, "live_at": self.clock(),
                                                   "stable": self.registry.current()})
        decided = self._test(canary, record)
        if decided is not None:
            self._start_next()
        return decided

    # ------------------------------------------------------------ the steps

    def _reconcile(self) -> None:
        """Record what an operator changed by hand (`policies promote|rollback|activate`, ActivatePolicy)."""
        current, canary = self.registry.current(), self.registry.canary()
        if canary and canary == current:  # ActivatePolicy named the canary: a promotion by hand
            self.registry.set_canary("")
            canary = ""
        live = self.registry.decision(canary) if canary else None
        if live and live.get("outcome") == LIVE and live.get("stable", current) != current:
            # CURRENT moved under a live canary: it was judged against a version no longer served.
            self.registry.set_canary("")
            self._close(canary, ROLLED_BACK, f"CURRENT changed by an operator (to {current or '(base)'}) while it "
                                             "was live", {"by": "operator", "rejects_line": False}, label="overridden")
            canary = ""
        records = self.registry.decisions()  # one read of the records for both checks below
        for version in self.registry.with_outcome(LIVE, records):
            if version == canary:
                continue
            outcome = PROMOTED if version == current else ROLLED_BACK
            # An operator's rollback rejects the candidates trained on top of it too.
            self._close(version, outcome, "by an operator: CANARY or CURRENT changed outside the controller",
                        {"by": "operator", "rejects_line": outcome == ROLLED_BACK}, label="overridden")
        for version in self.registry.with_outcome(QUEUED, records):
            if version == current:  # activated by hand before its turn
                self._close(version, PROMOTED, "by an operator: activated before its turn as the canary",
                            {"by": "operator"}, label="overridden")

    def _start_next(self) -> None:
        """Make the newest queued candidate that descends from CURRENT through accepted versions the canary.

        Rejected on the way: a version rolled back as worse, a discarded one, and a promoted one that
        is no longer CURRENT (an operator rolled back from it) — candidates trained on top of any of
        them are discarded. Older acceptable ones are superseded by the newest, which carries their
        updates. A candidate that cannot become the canary (its files fail verification) is discarded.
        The newest goes live only when `_ready`; until then it and the older ones stay queued.
        """
        current = self.registry.current()
        records = self.registry.decisions()
        rejected = {r["version"] for r in records if r.get("outcome") in (DISCARDED, PROMOTED)
                    or (r.get("outcome") == ROLLED_BACK and r.get("rejects_line", True))}
        # A record without queued_at (a candidate queued by hand) counts as long queued: it may go live at once
        # rather than wait for a timeout that could never start.
        queued_at = {r["version"]: r.get("queued_at", 0.0) for r in records}
        tested = {r["version"] for r in records if "live_at" in r}
        chosen = ""
        for version in reversed(self.registry.with_outcome(QUEUED, records)):
            chain = self.registry.lineage(version, current)
            if chain is None or rejected & set(chain):
                self._discard(version, f"not trained from CURRENT {current or '(base)'} through versions users "
                                       "accepted")
            elif not chosen and not self._ready(version, chain, queued_at, tested):
                return  # the newest waits for more rounds on top of it; the older ones stay queued behind it
            elif chosen:
                self.registry.record(version, {"outcome": SUPERSEDED, "decided_at": self.clock(),
                                               "reason": f"{chosen}, trained from it, went live instead"})
                metrics.CANARY_DECISIONS.labels(SUPERSEDED).inc()
            else:
                try:  # the pointer first: a crash before the record is repaired by the next step
                    self.registry.set_canary(version)
                except (InvalidArgument, NotFound) as e:
                    self._discard(version, f"cannot be served: {e}")
                    continue
                self.registry.record(version, {"outcome": LIVE, "live_at": self.clock(), "stable": current})
                chosen = version
                log.info("canary live", extra={"version": chosen, "stable": current or "(base)",
                                               "rounds_past_current": len(chain)})

    def _ready(self, version: str, chain: list[str], queued_at: dict[str, float], tested: set[str]) -> bool:
        """Whether the newest acceptable candidate may go live: canary_min_rounds past CURRENT (`chain` is its
        lineage), or it continues a line users already judged (a canary superseded or rolled back without
        rejecting its line: the newest of that line replaces it, whatever its count), or it has been the
        newest for canary_queue_timeout_seconds."""
        if len(chain) >= self.config.canary_min_rounds or tested & set(chain[:-1]):
            return True
        return self.clock() - queued_at.get(version, 0.0) >= self.config.canary_queue_timeout_seconds

    def _discard(self, version: str, reason: str) -> None:
        self.registry.record(version, {"outcome": DISCARDED, "decided_at": self.clock(), "reason": reason})
        metrics.CANARY_DECISIONS.labels(DISCARDED).inc()

    def _test(self, canary: str, record: dict) -> dict | None:
        """Gather the evidence since the canary went live and act on the sequential test."""
        stable = self.registry.current()
        # With canary_same_users, the canary's own users judge both versions (interleaved pairs give them
        # stable replies too), so a share of users who rate unlike the rest cannot bias the comparison;
        # without enough such stable ratings (traffic of n = 1 only), every user's stable ratings count.
        seen = self.store.compare_versions(canary, stable, record["live_at"], same_users=self.config.canary_same_users)
        if self.config.canary_same_users and seen.b_rated < MIN_SAME_USER_STABLE_RATINGS:
            seen = self.store.compare_versions(canary, stable, record["live_at"])
        gain, gain_se = self.reward_gain(canary, stable)
        evidence = Evidence(canary_up=seen.a_up, canary_rated=seen.a_rated, stable_up=seen.b_up,
                            stable_rated=seen.b_rated, pair_wins=seen.a_wins, pairs=seen.pairs,
                            reward_gain=gain, reward_gain_se=gain_se)
        decision = decide(evidence, self.test)
        self.last = decision
        for kind, value in zip(EVIDENCE_KINDS, (seen.a_rated, seen.b_rated, seen.pairs, decision.delta, decision.llr),
                               strict=True):
            metrics.CANARY_EVIDENCE.labels(kind).set(value)
        numbers = json_safe({"evidence": vars(evidence), "test": decision.as_dict()})
        age = self.clock() - record["live_at"]
        # A rollback drops the candidates trained on top of the canary only when the users found it
        # worse beyond noise; one merely not shown better (the reward-hacking signature included: a
        # learned-reward gain measured on a few dozen held-out replies against users' thumbs-up no
        # higher within noise) keeps its line, whose newest candidate is judged next on its own.
        rejects_line = decision.clearly_worse
        looks = float(canary_looks(seen.a_rated, seen.pairs, self.test.pair_overlap))
        if decision.outcome == "continue" and self._replaceable(canary, looks, decision):
            self.registry.set_canary("")
            return self._close(canary, SUPERSEDED, f"undecided after {self.config.canary_replace_after}+ canary "
                                                   f"completions judged and leaning to not better; the newest "
                                                   f"candidate trained from it replaces it ({decision.reason})", numbers,
                               label=SUPERSEDED)
        if decision.outcome == "continue" and self.config.canary_max_looks and looks >= self.config.canary_max_looks:
            why = f"undecided after {looks:.0f} judged canary completions (canary_max_looks " \
                  f"{self.config.canary_max_looks}), decided by the test's lean: {decision.reason}"
            if lean_promotes(decision.llr, self.test) and not decision.hacking and not decision.clearly_worse:
                self.registry.promote()
                return self._close(canary, PROMOTED, why, numbers, label="truncated_promoted")
            return self._rollback(canary, why, numbers, label="truncated_rolled_back", rejects_line=rejects_line)
        if decision.outcome == "continue" and age >= self.config.canary_timeout_seconds:
            return self._rollback(canary, f"no decision after {age:.0f} s (timeout "
                                          f"{self.config.canary_timeout_seconds:g} s): {decision.reason}", numbers,
                                  label="timed_out", rejects_line=rejects_line)
        if decision.outcome == "promote":
            self.registry.promote()
            return self._close(canary, PROMOTED, decision.reason, numbers, label=PROMOTED)
        if decision.outcome == "rollback":
            return self._rollback(canary, decision.reason, numbers, label=ROLLED_BACK, rejects_line=rejects_line)
        self.registry.record(canary, numbers)  # the evidence so far, for anyone watching
        return None

    def _replaceable(self, canary: str, looks: float, decision: Decision) -> bool:
        """canary_replace_after: judged that often (`looks`), undecided but leaning to "not better", and a newer
        candidate trained from it queued.

        Leaning to "not better" (llr <= 0: the effect estimate at or under the test's indifference point)
        means the test is heading for a rollback that would not discard the line, after which the newest
        candidate goes live anyway: replacing it now saves the wait. A canary leaning to promotion keeps
        its evidence (replaced, it would start over); one found worse beyond noise is kept so that its
        rollback discards its line.
        """
        after = self.config.canary_replace_after
        if not after or decision.llr > 0 or decision.clearly_worse:
            return False
        if looks < after:
            return False
        return any(self.registry.lineage(v, canary) for v in self.registry.with_outcome(QUEUED))

    def _rollback(self, canary: str, reason: str, numbers: dict, *, label: str, rejects_line: bool) -> dict:
        self.registry.set_canary("")
        return self._close(canary, ROLLED_BACK, reason, {**numbers, "rejects_line": rejects_line}, label=label)

    def _close(self, version: str, outcome: str, reason: str, numbers: dict, *, label: str) -> dict:
        """Write the decision into the version's record, count it and log it."""
        rec = self.registry.record(version, {**numbers, "outcome": outcome, "reason": reason, "decided_at": self.clock()})
        metrics.CANARY_DECISIONS.labels(label).inc()
        log.info("canary decided", extra={"version": version, "outcome": outcome, "reason": reason})
        return rec

    def reward_gain(self, canary: str, stable: str) -> tuple[float, float]:
        """The learned-reward gain the trainer's gates measured from `stable` to `canary`, and its standard error.

        Summed over the lineage (a canary may be several rounds past the stable version); nan when
        any step lacks the numbers (e.g. a version published before they were recorded).
        """
        chain = self.registry.lineage(canary, stable) or []
        gain, var = 0.0, 0.0
        for version in chain:
            m = self.registry.info(version).get("metrics", {})
            try:
                gain += float(m["eval/reward"]) - float(m["eval/reward_current"])
                var += float(m["eval/reward_diff_se"]) ** 2
            except (KeyError, TypeError, ValueError):
                return math.nan, math.nan
        return (gain, math.sqrt(var)) if chain else (math.nan, math.nan)

    # ------------------------------------------------------------ the poll thread

    def run(self) -> None:
        """Step every poll_seconds until stopped; a failing step is logged, never fatal."""
        while not self._stop.wait(self.config.canary_poll_seconds):
            try:
                self.step()
            except Exception:
                log.exception("canary controller step failed")

    def start(self) -> CanaryController:
        """Poll in a daemon thread."""
        threading.Thread(target=self.run, name="canary-controller", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
