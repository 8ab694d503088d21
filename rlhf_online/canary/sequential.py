"""Promote or roll back a canary version: Wald's sequential test on users' thumbs and interleaved pairs.

A canary adapter serves a share of the users (sticky per user) while the stable version serves the
rest. The controller calls `decide(evidence, config)` whenever it looks at the counts; the answer is
"promote", "rollback" or "continue" (keep collecting). Timeouts are the controller's: it rolls back
a canary that has not been decided by its deadline.

The effect. δ = canary thumbs-up rate − stable thumbs-up rate, in rate units (0.05 = 5 points).

Thumbs. δ̂_t = p̂_c − p̂_s, variance p̃_c(1−p̃_c)/n_c + p̃_s(1−p̃_s)/n_s, where p̃ = (up+1)/(rated+2)
is the add-one smoothed rate: 20/20 thumbs up is not proof of zero variance.

Interleaved pairs. A user who asked for n=2 under a canary gets one candidate of each version in
random order and picks one. Under the Bernoulli user (prefers the candidate it would thumb up, a coin
flip when both or neither), P(canary preferred) = p_c(1−p_s) + (p_c p_s + (1−p_c)(1−p_s))/2
= 1/2 + δ/2, so δ̂_p = 2ŵ − 1 with variance 4w̃(1−w̃)/pairs (w̃ smoothed as above). Real users
compare on finer preferences than thumbs (they pick between two liked replies rather than toss a
coin), so real pairs show an effect at least this strongly: they only make decisions faster, and in
the right direction.

Combining. δ̂ is the inverse-variance weighted mean of the two estimates (a source with no data has
weight 0). They are not independent, though: when a pair's two candidates were also thumbed, their
ratings are in both, and under the Bernoulli user the preference is those thumbs again plus a coin
on ties. Treating the pair as new evidence would understate var(δ̂) by about 20% at the bench's mix
(bench canary with pair_overlap 0: a −5-point canary promoted in 5.8% of trials, not 3.5%). So v = var(δ̂) counts the covariance
cov(δ̂_t, δ̂_p) = (k_c p̃_c(1−p̃_c)/n_c + k_s p̃_s(1−p̃_s)/n_s)/pairs, where k = min(pair_overlap·pairs,
n) pairs share their candidate's thumbs. (Least-squares weights for that covariance would drop the
pairs altogether in the Bernoulli model; we keep them because real preferences carry more.)

The test. Wald's SPRT on the Gaussian approximation δ̂ ~ N(δ, v): H_worse: δ = θ0 = −worse_by
against H_ok: δ = θ1 = better_by. Its log-likelihood ratio is

    llr = (θ1 − θ0)(δ̂ − (θ0 + θ1)/2) / v,

promote at llr ≥ log((1−β)/α), roll back at llr ≤ log(β/(1−α)), else continue. For a Gaussian
watched continuously that makes P(promote | δ = θ0) = α and P(rollback | δ = θ1) = β. Ours promotes a
worse canary more often than α: the variance is estimated from the same ratings, and at a stable
thumbs-up rate above 1/2 a canary that got lucky (a higher rate) also gets a smaller variance, so its
llr grows faster than its luck: with the defaults but α = 0.05 the bench promotes 6.5%. The
defaults are therefore tuned on the bench, not on the formula. No decision before min_canary_ratings
looks at the canary: a canary rating is one look, and so is a pair (its user judged a canary
candidate), but a pair whose canary candidate was also thumbed is the same look counted once
(pair_overlap says how many were); below that the Gaussian approximation is too rough.

The defaults. θ0 = −worse_by = −0.05, θ1 = better_by = +0.10, α = 0.02, β = 0.3, 30 canary
ratings. On `rlhf-online bench canary` (Bernoulli users, stable thumbs-up 0.7, 20% canary share, half
the requests interleaved pairs, decide() every 10 ratings, rollback at 1000 canary ratings, 5000
trials per effect) a −5-point canary is promoted in 3.4-3.6% of trials (target ≤ 5%) and a +10-point
one in 86-87% (target ≥ 80%), after a median of 44 canary ratings (about 330 ratings in all). The
alternatives need more ratings for the same targets: θ1 = +0.05 about 60, θ1 = 0 ("not worse")
about 85-95. θ1 = +0.10 puts the test's indifference point at (θ0+θ1)/2 = +2.5 points, and that is
its consequence: a canary exactly as good as the stable is rolled back in about 81% of trials, and
one 5 points better is promoted only about as often as not (56%). A new version has to show the
users that it is better to replace the stable; one that merely does no harm is dropped, which costs
a round of training, never the users' experience. The margins hold, thinner, off the bench's
defaults: at a stable rate of 0.5 the power is 82%, at 0.88 false promotion 4.5%, and looking after
every rating 4.3%.

Reward hacking. A canary whose learned reward rose clearly by the trainer's gate (reward_gain >
hacking_z · reward_gain_se) while the users' thumbs-up did not (δ̂ ≤ 0) learned to please the reward
model, not the users: a "promote" then becomes a "rollback" that says so. (With θ1 ≥ worse_by, the
defaults included, the llr is positive only for δ̂ > (θ0+θ1)/2 ≥ 0, so the SPRT itself never promotes
at δ̂ ≤ 0; the guard matters for a smaller θ1.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rlhf_online.artifacts import json_safe
from rlhf_online.errors import InvalidArgument
from rlhf_online.ppo.config import _refuse, knob

PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"


@dataclass(frozen=True)
class Evidence:
    """What users said about the canary and the stable version since the canary went live."""

    canary_up: int = 0  # thumbs-up on the canary's completions
    canary_rated: int = 0  # thumbs ratings (up + down) on the canary's completions
    stable_up: int = 0
    stable_rated: int = 0
    pair_wins: int = 0  # interleaved pairs (one candidate of each version) whose user preferred the canary's
    pairs: int = 0  # interleaved pairs with a preference
    reward_gain: float = math.nan  # learned-reward gain of the canary over its parent by the trainer's gate (nan: unknown)
    reward_gain_se: float = math.nan  # its standard error

    def __post_init__(self) -> None:
        """Reject counts no users could have produced, naming the field."""
        for name, ok in (("canary_rated", self.canary_rated >= 0), ("stable_rated", self.stable_rated >= 0),
                         ("pairs", self.pairs >= 0), ("canary_up", 0 <= self.canary_up <= self.canary_rated),
                         ("stable_up", 0 <= self.stable_up <= self.stable_rated),
                         ("pair_wins", 0 <= self.pair_wins <= self.pairs)):
            if not ok:
                raise InvalidArgument(name, f"invalid count {getattr(self, name)!r} "
                                            "(counts are >= 0, and ups/wins at most their total)")


@dataclass(frozen=True)
class CanaryTestConfig:
    """The canary test's hypotheses, error rates and guards (defaults meet `bench canary`'s targets)."""

    worse_by: float = knob(0.05, "drop of the thumbs-up rate (canary minus stable) that counts as worse: "
                                 "H_worse is delta = -worse_by")
    better_by: float = knob(0.10, "H_ok, the alternative that promotes: delta = better_by (0: 'not worse', "
                                  "which needs about twice the ratings; see the module docstring)")
    alpha: float = knob(0.02, "nominal P(promote | the canary is worse by worse_by); the plug-in variance makes "
                              "the real one higher (bench canary: 0.02 gives about 0.035)")
    beta: float = knob(0.3, "nominal P(rollback | the canary is better by better_by)")
    min_canary_ratings: int = knob(30, "no decision before users judged this many canary completions "
                                       "(thumbs or pairs, each canary candidate once)")
    pair_overlap: float = knob(1.0, "share of interleaved pairs whose two candidates were also thumbed (so their "
                                    "ratings are in the thumbs counts too); 1 is the conservative bound")
    hacking_z: float = knob(2.0, "a learned-reward gain above this many standard errors, with users' thumbs-up "
                                 "not higher, turns a promotion into a rollback (reward hacking)")

    def __post_init__(self) -> None:
        """Reject values the test cannot run with, naming the field."""
        _refuse(self, {
            "worse_by": (0 < self.worse_by < 1, "in (0, 1)"),
            "better_by": (-self.worse_by < self.better_by < 1, "in (-worse_by, 1)"),
            "alpha": (0 < self.alpha < 0.5, "in (0, 0.5)"), "beta": (0 < self.beta < 1 - self.alpha, "in (0, 1 - alpha)"),
            "min_canary_ratings": (self.min_canary_ratings >= 1, ">= 1"),
            "pair_overlap": (0 <= self.pair_overlap <= 1, "in 0..1"),
            "hacking_z": (self.hacking_z >= 0, ">= 0"),
        })

    @property
    def promote_at(self) -> float:
        """Upper threshold of the llr: log((1 - beta) / alpha)."""
        return math.log((1 - self.beta) / self.alpha)

    @property
    def rollback_at(self) -> float:
        """Lower threshold of the llr: log(beta / (1 - alpha))."""
        return math.log(self.beta / (1 - self.alpha))


@dataclass(frozen=True)
class Decision:
    """The test's verdict on the evidence, with the numbers it rests on."""

    outcome: str  # "promote" | "rollback" | "continue"
    reason: str  # one human sentence with the numbers (delta, its se, llr, counts)
    delta: float  # estimated canary minus stable thumbs-up rate
    delta_se: float
    llr: float  # the test statistic
    hacking: bool = False  # the learned reward rose clearly while the users' thumbs-up did not

    @property
    def clearly_worse(self) -> bool:
        """The users rated the canary below the stable version beyond noise (delta's 95% interval below 0)."""
        return math.isfinite(self.delta) and math.isfinite(self.delta_se) and self.delta + 1.96 * self.delta_se < 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (nan and inf as None), for recording the decision with its evidence."""
        return json_safe(asdict(self))


# The statistic is written on numpy arrays so that `bench canary` runs thousands of simulated
# canaries through the same code as decide(); decide() calls it on one set of counts.

def _smoothed(up: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Add-one smoothed rate: never exactly 0 or 1, so a variance built on it is never 0."""
    return (up + 1.0) / (n + 2.0)


def estimate(canary_up: Any, canary_rated: Any, stable_up: Any, stable_rated: Any, pair_wins: Any, pairs: Any,
             pair_overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """(δ̂, its variance) from thumbs and pairs, elementwise; nan where there is no evidence at all."""
    cu, cn, su, sn, pw, m = (np.asarray(x, dtype=float) for x in
                             (canary_up, canary_rated, stable_up, stable_rated, pair_wins, pairs))
    thumbs, paired = (cn > 0) & (sn > 0), m > 0
    # Where a source has no data its estimate is computed on 1 (to stay finite) and weighted 0.
    cn1, sn1, m1 = np.maximum(cn, 1.0), np.maximum(sn, 1.0), np.maximum(m, 1.0)
    pc, ps, w = _smoothed(cu, cn), _smoothed(su, sn), _smoothed(pw, m)
    var_c, var_s = pc * (1 - pc), ps * (1 - ps)
    d_t, v_t = cu / cn1 - su / sn1, var_c / cn1 + var_s / sn1
    d_p, v_p = 2 * pw / m1 - 1, 4 * w * (1 - w) / m1
    # The pairs whose candidates were also thumbed repeat those thumbs: their shared variance.
    cov = (np.minimum(pair_overlap * m, cn) * var_c / cn1 + np.minimum(pair_overlap * m, sn) * var_s / sn1) / m1
    a_t, a_p = np.where(thumbs, 1 / v_t, 0.0), np.where(paired, 1 / v_p, 0.0)
    total = a_t + a_p
    with np.errstate(invalid="ignore", divide="ignore"):
        k_t, k_p = a_t / total, a_p / total
    return k_t * d_t + k_p * d_p, k_t ** 2 * v_t + k_p ** 2 * v_p + 2 * k_t * k_p * np.where(thumbs, cov, 0.0)


def log_likelihood_ratio(delta: Any, var: Any, config: CanaryTestConfig) -> np.ndarray:
    """Wald's llr of H_ok (δ = better_by) against H_worse (δ = -worse_by); 0 where there is no evidence."""
    theta0, theta1 = -config.worse_by, config.better_by
    delta, var = np.asarray(delta, dtype=float), np.asarray(var, dtype=float)
    ok = np.isfinite(delta) & np.isfinite(var) & (var > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (theta1 - theta0) * (delta - (theta0 + theta1) / 2) / var, 0.0)


def canary_looks(canary_rated: Any, pairs: Any, pair_overlap: float) -> np.ndarray:
    """Canary completions users judged: ratings plus pairs, a pair's thumbed canary candidate counted once."""
    cn, m = np.asarray(canary_rated, dtype=float), np.asarray(pairs, dtype=float)
    return cn + m - np.minimum(pair_overlap * m, cn)


def lean_promotes(llr: Any, config: CanaryTestConfig) -> Any:
    """canary_max_looks: at the limit, an undecided test's lean promotes when llr is at least halfway to the
    promotion bound (llr > 0 promoted a canary 5 points worse in 10.7% of `bench canary` trials, halfway 3.0%)."""
    return llr >= config.promote_at / 2


def decide(evidence: Evidence, config: CanaryTestConfig) -> Decision:
    """Promote, roll back, or continue collecting, by the SPRT on the evidence (module docstring)."""
    e = evidence
    delta, var = (float(x) for x in estimate(e.canary_up, e.canary_rated, e.stable_up, e.stable_rated,
                                             e.pair_wins, e.pairs, config.pair_overlap))
    llr = float(log_likelihood_ratio(delta, var, config))
    se = math.sqrt(var) if math.isfinite(var) else math.nan
    looks = int(canary_looks(e.canary_rated, e.pairs, config.pair_overlap))
    effect = f"delta {100 * delta:+.1f} points (se {100 * se:.1f})" if math.isfinite(delta) else "no effect estimate yet"
    numbers = (f"{effect}, llr {llr:.2f} "
               f"(rollback <= {config.rollback_at:.2f}, promote >= {config.promote_at:.2f}); "
               f"canary {e.canary_up}/{e.canary_rated} up, stable {e.stable_up}/{e.stable_rated} up, "
               f"canary preferred in {e.pair_wins}/{e.pairs} pairs")
    worse, better = f"{100 * config.worse_by:g} points worse", f"{100 * config.better_by:+g} points"
    if looks < config.min_canary_ratings:
        return Decision(CONTINUE, f"continue: {looks} canary completions judged, fewer than "
                                  f"min_canary_ratings {config.min_canary_ratings}; {numbers}", delta, se, llr)
    gain, gain_se = e.reward_gain, e.reward_gain_se
    hacked = math.isfinite(gain) and math.isfinite(gain_se) and gain > config.hacking_z * gain_se and delta <= 0
    hacking = (f"reward hacking: the learned reward rose by {gain:.3g} (se {gain_se:.3g}, above "
               f"{config.hacking_z:g} se) while users' thumbs-up did not rise")
    if llr <= config.rollback_at:  # a reward-hacking canary is usually caught here: the reason names the signature
        why = f" ({hacking})" if hacked else ""
        return Decision(ROLLBACK, f"rollback{why}: the ratings favour a canary {worse} over one at {better}; "
                                  f"{numbers}", delta, se, llr, hacked)
    if llr < config.promote_at:
        return Decision(CONTINUE, f"continue: not yet decided between {worse} and {better}; {numbers}", delta, se, llr)
    if hacked:
        return Decision(ROLLBACK, f"rollback ({hacking}); {numbers}", delta, se, llr, True)
    return Decision(PROMOTE, f"promote: the ratings favour a canary at {better} over one {worse}; {numbers}",
                    delta, se, llr)
