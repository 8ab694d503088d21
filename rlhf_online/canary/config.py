"""The canary controller's own knobs (the sequential test's are canary.sequential.CanaryTestConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_online.ppo.config import _refuse, knob


@dataclass(frozen=True)
class CanaryConfig:
    """Whether candidates go through a canary, and how long one may take."""

    # Off by default in the service, as canary rollouts are (Argo Rollouts, Flagger): deciding needs rated
    # traffic, and a deployment without it would roll every candidate back at the timeout. The demo turns it on.
    canary: bool = knob(False, "publish each candidate as a canary that its users' feedback promotes or rolls back; "
                               "false: every candidate that passes the gate becomes CURRENT at once")
    canary_timeout_seconds: float = knob(900.0, "roll a canary back if the test has not decided after this long")
    canary_poll_seconds: float = knob(5.0, "how often the controller reads the canary's evidence")
    # A canary barely different from the stable version (the first rounds' usually are) is the slowest to
    # decide: the test needs the most ratings where the effect sits between its two hypotheses. Meanwhile
    # the trainer queues candidates with more training on top of it. Replacing it never promotes anything
    # untested: the replacement starts its own test from zero evidence.
    canary_replace_after: int = knob(0, "once users judged this many of a canary's completions without a decision "
                                        "and the test leans to 'not better' (llr <= 0), the newest candidate "
                                        "trained from it replaces it as the canary (0 = never: each canary is "
                                        "decided or times out)")
    # A canary whose effect sits between the test's hypotheses but leans to "better" is not replaced
    # (it would start over) and, with few users, can hold the slot for many minutes while better-trained
    # candidates queue behind it (a demo run: +6.7 points, llr 2.83 of 3.56 after 225 ratings, 9 minutes).
    # A truncated sequential test bounds that: at the limit it decides by which hypothesis the evidence
    # leans to. Halfway to the promotion bound, not llr > 0: in `bench canary` (a 50% share,
    # same-users evidence, 150 looks) llr > 0 promoted a canary 5 points worse in 10.7% of trials (1.8%
    # untruncated); halfway, 3.0%, at a cost in power (+10 points promoted in 61% instead of 75%).
    canary_max_looks: int = knob(0, "once users judged this many of a canary's completions without a decision, "
                                    "decide by the test's lean: promote when llr is at least halfway to the "
                                    "promotion bound (and no reward-hacking signature), else roll back (0 = never: "
                                    "decided by the test or the timeout)")
    # A candidate one round past the stable version differs from it by updates_per_round early-stopped PPO steps
    # (each approx. KL <= early_stop_approxkl): often too little for its users to tell apart in minutes (demo runs:
    # +2 points after 151 of its replies judged, 2.5 minutes of the slot), while the rounds behind it queue the
    # candidates that would decide. With learn_from_traffic, rounds train on the traffic of the version they start
    # from (head: here, often a held-back candidate nobody is served), so they fall back to the trainer's own
    # rollouts then. Holding candidates back until they carry several rounds gives the slot to one worth testing; the
    # queue timeout keeps a candidate from waiting forever when training stalls (rounds refused at the KL budget).
    canary_min_rounds: int = knob(1, "a queued candidate goes live only once it is at least this many published "
                                     "rounds past the stable version, or continues the line of a canary users "
                                     "judged (1 = every candidate)")
    # Longer than the rounds' cadence (the service's round_interval_seconds is 600), or every candidate would wait
    # it out and go live short of canary_min_rounds.
    canary_queue_timeout_seconds: float = knob(1800.0, "a candidate short of canary_min_rounds goes live anyway "
                                                       "once it was the newest for this long")
    # Every user's stable ratings are an unbiased comparison when the share is a hash of many users (a
    # random sample), and the test's error rates were measured on them. With a handful of users the
    # share is no random sample (the demo's 6 users of two personas that rate differently), and only
    # the stable replies of the canary's own users (their interleaved pairs) make a fair comparison.
    canary_same_users: bool = knob(False, "compare the canary with the stable replies of its own users only (their "
                                          "interleaved pairs): for a share of few users; noisier (bench canary "
                                          "--stable-evidence same-users)")

    def __post_init__(self) -> None:
        """Reject values the controller cannot run with, naming the field."""
        _refuse(self, {"canary_timeout_seconds": (self.canary_timeout_seconds > 0, "> 0"),
                       "canary_poll_seconds": (self.canary_poll_seconds > 0, "> 0"),
                       "canary_replace_after": (self.canary_replace_after >= 0, ">= 0"),
                       "canary_max_looks": (self.canary_max_looks >= 0, ">= 0"),
                       "canary_min_rounds": (self.canary_min_rounds >= 1, ">= 1"),
                       "canary_queue_timeout_seconds": (self.canary_queue_timeout_seconds > 0, "> 0")})
