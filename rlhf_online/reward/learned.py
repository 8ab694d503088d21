"""The learned reward model: a frozen sentence encoder and a small scalar head trained on users' feedback.

Features of (prompt, completion) are [c, p * c]: the completion's embedding carries its tone and
content, and the element-wise product how it relates to what was asked. The head is an MLP to one
score r; Bradley-Terry models P(a preferred over b) = sigmoid(r_a - r_b), and a thumbs-up is
modelled as sigmoid(r + bias).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_online.reward.encoder import TextEncoder


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the scalar head and the constants that calibrate its output."""

    dim: int = 384  # encoder width; features are 2 * dim
    hidden: int = 256
    dropout: float = 0.1
    offset: float = 0.0  # mean raw score on the training completions: served scores are centred on it
    bias: float = 0.0  # pointwise logit of a thumbs-up is r + bias


class RewardHead(nn.Module):
    """[N, 2*dim] features -> [N] scores."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        # hidden == 0: a linear head (logistic / Bradley-Terry regression on the features)
        self.net = (nn.Linear(2 * cfg.dim, 1) if cfg.hidden == 0 else
                    nn.Sequential(nn.Linear(2 * cfg.dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.hidden, 1)))
        self.bias = nn.Parameter(torch.tensor(cfg.bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scores, one per row."""
        return self.net(features).squeeze(-1)


def features(encoder: TextEncoder, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """[N, 2*dim] features of (prompt, completion) pairs; identical texts are embedded once."""
    unique = list(dict.fromkeys([*prompts, *completions]))
    index = {t: i for i, t in enumerate(unique)}
    emb = encoder.embed(unique)
    p = emb[[index[t] for t in prompts]]
    c = emb[[index[t] for t in completions]]
    return torch.cat([c, p * c], dim=-1)


class LearnedReward:
    """Scores completions with a trained head on top of the shared encoder."""

    kind = "learned"

    def __init__(self, encoder: TextEncoder, head: RewardHead, cfg: HeadConfig, version: str) -> None:
        self.encoder, self.head, self.cfg, self.version = encoder, head.eval(), cfg, version

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Centred scores: 0 is an average completion of the training data."""
        if not completions:
            return []
        raw = self.head(features(self.encoder, prompts, completions))
        return (raw - self.cfg.offset).tolist()

    @torch.no_grad()
    def raw_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Uncentred scores of precomputed features."""
        return self.head(feats)

    def save(self, directory: Path) -> None:
        """head.safetensors and head.json into a directory."""
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(directory / "head.safetensors"))
        (directory / "head.json").write_text(json.dumps({**asdict(self.cfg), "encoder": str(self.encoder.path)}))

    @classmethod
    def load(cls, directory: Path, encoder: TextEncoder, version: str) -> LearnedReward:
        """A saved head on the given encoder (its width must match)."""
        meta = json.loads((directory / "head.json").read_text())
        meta.pop("encoder", None)
        cfg = HeadConfig(**meta)
        if cfg.dim != encoder.dim:
            raise ValueError(f"reward head {directory} expects a {cfg.dim}-wide encoder, got {encoder.dim}")
        head = RewardHead(cfg)
        head.load_state_dict(load_file(str(directory / "head.safetensors")))
        return cls(encoder, head, cfg, version)


class UntrainedReward:
    """What the learned reward serves before any model was promoted: a neutral 0 for everything."""

    kind = "learned"
    version = ""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Zeros: no preference learned yet."""
        return [0.0] * len(completions)
