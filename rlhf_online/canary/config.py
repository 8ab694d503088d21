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
                       "canary_poll_seconds": (self.canary_poll_seconds > 0, "> 0")})
