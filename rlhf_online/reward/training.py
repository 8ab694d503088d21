"""Train and evaluate the learned reward model on the store's feedback.

Data: single thumbs (pointwise, logistic), explicit preferences, rankings, and thumbs-up vs
thumbs-down completions of the same prompt (pairwise, Bradley-Terry). A ranking of k completions
gives all its C(k, 2) ordered pairs, each weighted 1 / C(k, 2), so that one ranking weighs as much
as one preference (InstructGPT's scheme: a ranking is one judgement, not C(k, 2) independent ones);
every other pair weighs 1. Then no user may weigh more than `max_user_share` of a split: each user's
examples are scaled down to that cap (reward/user_cap.py), so one user sending ten times everyone's
feedback counts as one heavy user, not as the majority. The held-out slice is chosen by a hash
of the prompt (rlhf_online.data.split, the same rule as the PPO gate's), so a prompt is always on
the same side as data grows and held-out pairs test generalisation to prompts the model never
trained on; a ranking's completions answer one prompt, so all its pairs fall on one side. A trained
candidate is promoted unless it is worse than the current model beyond noise.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from rlhf_online.data.split import HELDOUT_PERCENT, is_heldout, prompt_key
from rlhf_online.reward.encoder import TextEncoder
from rlhf_online.reward.learned import HeadConfig, LearnedReward, RewardHead, features
from rlhf_online.reward.registry import RewardRegistry
from rlhf_online.reward.user_cap import UserShares, user_factors
from rlhf_online.reward.window import FeedbackWindow
from rlhf_online.store import CompletionRecord, Store

log = logging.getLogger("rlhf_online.reward")


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of one reward-model training."""

    heldout_percent: int = HELDOUT_PERCENT  # share of prompts (by hash) kept out of training
    epochs: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-2
    pairwise_weight: float = 1.0
    pointwise_weight: float = 1.0
    max_pairs_per_prompt: int = 16  # caps the up x down product of a much-rated prompt
    min_train_examples: int = 16  # pairs + singles needed before a model is trained at all
    head_hidden: int = 0  # width of the head's hidden layer; 0 = a linear head (measured best, see learned.py)
    ensemble: int = 5  # heads, each fit to a bootstrap resample of the examples
    pessimism: float = 1.0  # served score = mean - pessimism * std over the heads (0 = plain mean)
    max_user_share: float = 0.05  # most of a split's example weight one user's examples may carry (1 = no cap)
    window_examples: int = 20_000  # train on the newest this many thumbs, preferences and rankings (each)
    seed: int = 0


User = tuple[str, str]  # (tenant, user_id): whose feedback an example is


@dataclass
class Split:
    """Completions by id, with pairwise and pointwise examples."""

    completions: dict[str, CompletionRecord] = field(default_factory=dict)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (chosen id, rejected id)
    pair_weights: list[float] = field(default_factory=list)  # one per pair: 1, or 1 / C(k, 2) from a ranking of k
    pair_users: list[tuple[User, ...]] = field(default_factory=list)  # who said so: one user, or two for an implied pair
    singles: list[tuple[str, int]] = field(default_factory=list)  # (completion id, 1 = thumbs up)
    single_weights: list[float] = field(default_factory=list)
    single_users: list[User] = field(default_factory=list)
    shares: UserShares = field(default_factory=lambda: UserShares(0, float("nan"), float("nan")))

    def add_pair(self, chosen: str, rejected: str, users: tuple[User, ...], weight: float = 1.0) -> None:
        """One pairwise example, the user(s) it came from, and its weight."""
        self.pairs.append((chosen, rejected))
        self.pair_users.append(users)
        self.pair_weights.append(weight)

    def add_single(self, completion_id: str, label: int, user: User) -> None:
        """One thumbs rating (1 = up) by a user."""
        self.singles.append((completion_id, label))
        self.single_users.append(user)
        self.single_weights.append(1.0)

    def cap_users(self, max_share: float) -> None:
        """Scale each user's examples so that none carries more than `max_share` of the split's weight."""
        weight: dict[User, float] = defaultdict(float)
        for users, w in zip(self.pair_users, self.pair_weights, strict=True):
            for u in users:  # an implied pair belongs half to each of its two raters
                weight[u] += w / len(users)
        for u, w in zip(self.single_users, self.single_weights, strict=True):
            weight[u] += w
        if not weight:
            return
        factor, self.shares = user_factors(weight, max_share)
        self.pair_weights = [w * sum(factor[u] for u in users) / len(users)
                             for users, w in zip(self.pair_users, self.pair_weights, strict=True)]
        self.single_weights = [w * factor[u] for u, w in zip(self.single_users, self.single_weights, strict=True)]

    @property
    def examples(self) -> int:
        """Pairs plus singles."""
        return len(self.pairs) + len(self.singles)

    @property
    def pair_weight(self) -> float:
        """The pairs' total weight: how many independent judgements they amount to."""
        return sum(self.pair_weights)


@dataclass
class Dataset:
    """Training and held-out splits, and how much feedback they came from."""

    train: Split
    heldout: Split
    feedback_seen: int


def build_dataset(store: Store, cfg: TrainConfig, window: FeedbackWindow | None = None) -> Dataset:
    """The window's feedback (a fresh one of the store's newest `window_examples` if none is given), split by prompt."""
    if window is None:
        window = FeedbackWindow(store, cfg.window_examples)
        window.refresh()
    feedback, preferences, rankings = window.feedback, window.preferences, window.rankings
    comps = window.completions
    splits = {True: Split(), False: Split()}

    def split_of(cid: str) -> Split:
        s = splits[is_heldout(prompt_key(comps[cid]), cfg.heldout_percent)]
        s.completions[cid] = comps[cid]
        return s

    # prompt -> completion id -> the first user who rated it up (down): an implied pair is theirs
    ups: dict[str, dict[str, User]] = defaultdict(dict)
    downs: dict[str, dict[str, User]] = defaultdict(dict)
    for f in feedback:
        label, user = (1 if f.rating == "thumbs_up" else 0), (f.tenant, f.user_id)
        split_of(f.completion_id).add_single(f.completion_id, label, user)
        (ups if label else downs)[prompt_key(comps[f.completion_id])].setdefault(f.completion_id, user)
    for p in preferences:
        if prompt_key(comps[p.chosen_completion_id]) != prompt_key(comps[p.rejected_completion_id]):
            continue  # a preference across prompts says little about either reply
        split_of(p.rejected_completion_id)
        split_of(p.chosen_completion_id).add_pair(p.chosen_completion_id, p.rejected_completion_id,
                                                  ((p.tenant, p.user_id),))
    for r in rankings:  # the store only accepts rankings of one prompt: one side of the split holds them all
        weight = 1.0 / math.comb(len(r.completion_ids), 2)
        for better, worse in itertools.combinations(r.completion_ids, 2):  # best first: every earlier one won
            split_of(worse)
            split_of(better).add_pair(better, worse, ((r.tenant, r.user_id),), weight)
    for key in sorted(ups.keys() & downs.keys()):  # sorted: the same examples in the same order every run
        implied = [(u, d) for u in sorted(ups[key]) for d in sorted(downs[key]) if u != d]
        for u, d in implied[: cfg.max_pairs_per_prompt]:
            splits[is_heldout(key, cfg.heldout_percent)].add_pair(u, d, (ups[key][u], downs[key][d]))
    for split in splits.values():
        split.cap_users(cfg.max_user_share)
    return Dataset(train=splits[False], heldout=splits[True],
                   feedback_seen=len(feedback) + len(preferences) + len(rankings))


def _features(encoder: TextEncoder, split: Split) -> tuple[torch.Tensor, dict[str, int]]:
    """Features of every completion in a split, and the row of each id."""
    ids = list(split.completions)
    comps = [split.completions[i] for i in ids]
    prompts = [c.prompt or "\n".join(m[1] for m in c.messages) for c in comps]
    return features(encoder, prompts, [c.text for c in comps]), {cid: k for k, cid in enumerate(ids)}


@torch.enable_grad()
def train(encoder: TextEncoder, data: Dataset, cfg: TrainConfig, version: str) -> LearnedReward:
    """Fit a fresh head on the training split (full batch: the features are small and precomputed)."""
    torch.manual_seed(cfg.seed)
    feats, row = _features(encoder, data.train)
    head_cfg = HeadConfig(dim=encoder.dim, encoder_layer=encoder.layer, hidden=cfg.head_hidden,
                          members=cfg.ensemble, pessimism=cfg.pessimism)
    head = RewardHead(head_cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    chosen = torch.tensor([row[a] for a, _ in data.train.pairs], dtype=torch.long)
    rejected = torch.tensor([row[b] for _, b in data.train.pairs], dtype=torch.long)
    single = torch.tensor([row[c] for c, _ in data.train.singles], dtype=torch.long)
    labels = torch.tensor([y for _, y in data.train.singles], dtype=torch.float)
    # Bootstrap: member k sees each example w[k, i] ~ Multinomial times (one member: every example once).
    gen = torch.Generator().manual_seed(cfg.seed)

    def resample(n: int) -> torch.Tensor:
        if cfg.ensemble == 1 or n == 0:
            return torch.ones(cfg.ensemble, n)
        return torch.stack([torch.bincount(torch.randint(n, (n,), generator=gen), minlength=n).float()
                            for _ in range(cfg.ensemble)])

    # A ranking's pairs carry 1 / C(k, 2) each on top of the resample: a ranking weighs as one preference.
    pair_weight = torch.tensor(data.train.pair_weights, dtype=torch.float)  # [pairs]
    single_weight = torch.tensor(data.train.single_weights, dtype=torch.float)  # [singles]: the per-user cap
    w_pair, w_single = resample(len(chosen)) * pair_weight, resample(len(single)) * single_weight  # [K, n]
    t0 = time.time()
    loss = torch.zeros(())
    head.train()
    for _ in range(cfg.epochs):
        r = head.members(feats)  # [K, N]
        loss = torch.zeros(())
        if len(chosen):
            bt = -F.logsigmoid(r[:, chosen] - r[:, rejected])  # [K, pairs]
            loss = loss + cfg.pairwise_weight * ((bt * w_pair).sum(1) / w_pair.sum(1)).sum()
        if len(single):
            bce = F.binary_cross_entropy_with_logits(r[:, single] + head.bias, labels.expand(len(r), -1),
                                                     reduction="none")  # [K, singles]
            loss = loss + cfg.pointwise_weight * ((bce * w_single).sum(1) / w_single.sum(1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss = loss / cfg.ensemble
    head.eval()
    with torch.no_grad():
        offset = float(head.served(feats).mean()) if len(feats) else 0.0
    head_cfg = replace(head_cfg, offset=offset, bias=float(head.bias.detach()))
    log.info("reward model trained", extra={"version": version, "examples": data.train.examples,
                                            "seconds": round(time.time() - t0, 2), "loss": round(float(loss.detach()), 4)})
    return LearnedReward(encoder, head, head_cfg, version)


def evaluate(model: LearnedReward, encoder: TextEncoder, split: Split) -> dict[str, float]:
    """Held-out pairwise (weighted like training) and pointwise accuracy, calibration (Brier score, ECE), counts."""
    out = {"heldout_pairs": float(len(split.pairs)), "heldout_singles": float(len(split.singles))}
    if not split.completions:
        return out
    feats, row = _features(encoder, split)
    r = model.raw_scores(feats)
    if split.pairs:
        right = [w * float(r[row[a]] > r[row[b]]) for (a, b), w in zip(split.pairs, split.pair_weights, strict=True)]
        out["pairwise_accuracy"] = sum(right) / split.pair_weight
    if split.singles:
        p = torch.sigmoid(torch.stack([r[row[c]] for c, _ in split.singles]) + model.cfg.bias)
        y = torch.tensor([float(lbl) for _, lbl in split.singles])
        out["pointwise_accuracy"] = float(((p > 0.5).float() == y).float().mean())
        out["brier"] = float(((p - y) ** 2).mean())
        out["ece"] = expected_calibration_error(p, y)
    return out


def expected_calibration_error(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    """Mean |confidence - frequency| over equal-width probability bins, weighted by bin size."""
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        mask = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        if mask.any():
            ece += float(mask.float().mean()) * abs(float(p[mask].mean()) - float(y[mask].mean()))
    return ece


def accuracy_margin(accuracy: float, n: int, z: float = 1.96) -> float:
    """The noise allowed when comparing two accuracies on the same n held-out pairs (~z standard errors)."""
    if n == 0:
        return 1.0
    p = min(max(accuracy, 0.05), 0.95)
    return z * math.sqrt(2 * p * (1 - p) / n)


def train_and_gate(registry: RewardRegistry, store: Store, encoder: TextEncoder, cfg: TrainConfig,
                   window: FeedbackWindow | None = None) -> tuple[dict, bool, str]:
    """Train a candidate on the window's feedback; promote it unless it is worse than the current one beyond noise.

    Returns (the candidate's manifest, promoted, reason). Every trained candidate is kept in the
    registry, promoted or not, so that its metrics can be audited.
    """
    t0 = time.time()
    data = build_dataset(store, cfg, window)
    if data.train.examples < cfg.min_train_examples:
        reason = f"not enough feedback: {data.train.examples} training examples < {cfg.min_train_examples}"
        return {"version": "", "metrics": {}, "feedback_seen": data.feedback_seen}, False, reason
    model = train(encoder, data, cfg, registry.next_version())  # the name it will be published under
    metrics = evaluate(model, encoder, data.heldout)
    metrics["train_examples"] = float(data.train.examples)
    metrics["train_seconds"] = round(time.time() - t0, 3)
    metrics.update(data.train.shares.as_metrics())  # how many users the data came from, the largest one's share
    current = registry.current()
    promoted, reason = True, "first reward model" if not current else ""
    if current:
        previous = evaluate(registry.load(current, encoder), encoder, data.heldout)
        new_acc, old_acc = metrics.get("pairwise_accuracy"), previous.get("pairwise_accuracy")
        metrics["previous_pairwise_accuracy"] = old_acc if old_acc is not None else float("nan")
        if new_acc is None or old_acc is None:
            reason = "no held-out pairs to compare on; promoted on training loss"
        else:
            # A ranking's pairs are one judgement: the noise is that of their total weight, not their count.
            margin = accuracy_margin(old_acc, round(data.heldout.pair_weight))
            promoted = new_acc >= old_acc - margin
            reason = (f"held-out pairwise accuracy {new_acc:.3f} vs {current} {old_acc:.3f} "
                      f"(allowed drop {margin:.3f} on {len(data.heldout.pairs)} pairs)")
    fields = {"parent": current, "metrics": metrics, "feedback_seen": data.feedback_seen,
              "train_config": asdict(cfg), "promoted": promoted, "reason": reason, "encoder": str(encoder.path)}
    version = registry.publish(model.save, **fields)
    if promoted:
        registry.activate(version)
    log.info("reward model candidate", extra={"version": version, "promoted": promoted, "reason": reason,
                                              "users": data.train.shares.users,
                                              "largest_user_share": round(data.train.shares.largest_share, 3),
                                              "largest_user_share_capped":
                                                  round(data.train.shares.largest_share_capped, 3)})
    return {"version": version, **fields}, promoted, reason
