"""The learned reward model: a frozen sentence encoder and a small scalar head trained on users' feedback.

Features of (prompt, completion) are [c, p * c]: the completion's embedding carries its tone and
content, and the element-wise product how it relates to what was asked. The head maps them to one
score r: linear by default (an MLP with `hidden` > 0), since on a thousand noisy ratings an MLP
overfits (bench reward-accuracy: the linear head on layer 3 ranks 0.65-0.71 of held-out pairs
right, the MLP on the last layer 0.59-0.60). Bradley-Terry models P(a preferred over b) =
sigmoid(r_a - r_b), and a thumbs-up is modelled as sigmoid(r + bias).

The head is an ensemble of such heads, each fit to a bootstrap resample of the feedback. Served
scores are mean - pessimism * std over the members: where the members disagree — on replies unlike
anything users rated — the reward is lower, so PPO is not paid for wandering off into text the
model merely extrapolates to (reward-model overoptimization; Coste et al., 2023).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_online.errors import ConfigError
from rlhf_online.reward.encoder import TextEncoder


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the scalar head and the constants that calibrate its output."""

    dim: int = 384  # encoder width; features are 2 * dim
    encoder_layer: int = -1  # the encoder layer whose mean the features pool (-1: the last, as before it was kept)
    hidden: int = 0
    dropout: float = 0.1
    offset: float = 0.0  # mean raw score on the training completions: served scores are centred on it
    bias: float = 0.0  # pointwise logit of a thumbs-up is r + bias
    members: int = 1  # heads in the ensemble, each fit to a bootstrap resample
    pessimism: float = 0.0  # served score = mean - pessimism * std over the members


class RewardHead(nn.Module):
    """[N, 2*dim] features -> [members, N] scores (one row per ensemble member)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()

        def member() -> nn.Module:
            # hidden == 0: a linear head (logistic / Bradley-Terry regression on the features)
            return (nn.Linear(2 * cfg.dim, 1) if cfg.hidden == 0 else
                    nn.Sequential(nn.Linear(2 * cfg.dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.hidden, 1)))

        self.nets = nn.ModuleList(member() for _ in range(cfg.members))
        self.bias = nn.Parameter(torch.tensor(cfg.bias))
        self.pessimism = cfg.pessimism

    def members(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scores of every member, [members, N]."""
        return torch.stack([net(features).squeeze(-1) for net in self.nets])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mean raw score over the members, [N] (what accuracy and calibration are measured on)."""
        return self.members(features).mean(0)

    def served(self, features: torch.Tensor) -> torch.Tensor:
        """Mean minus pessimism times the members' spread, [N]."""
        r = self.members(features)
        spread = r.std(0, unbiased=False) if len(self.nets) > 1 else torch.zeros_like(r[0])
        return r.mean(0) - self.pessimism * spread


def features(encoder: TextEncoder, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """[N, 2*dim] features of (prompt, completion) pairs; identical texts are embedded once (by the encoder)."""
    emb = encoder.embed([*prompts, *completions])
    p, c = emb[:len(prompts)], emb[len(prompts):]
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
        raw = self.head.served(features(self.encoder, prompts, completions))
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
        trained_on = cfg.encoder_layer if cfg.encoder_layer >= 0 else encoder.layers
        if trained_on != encoder.layer:
            # A setting, not a corrupt file: the service stops at start (or Train answers FAILED_PRECONDITION).
            raise ConfigError(f"encoder_layer: the reward head {directory} was trained on encoder layer {trained_on}, "
                              f"but the encoder pools layer {encoder.layer} (set encoder_layer to {trained_on} to serve it)")
        head = RewardHead(cfg)
        state = load_file(str(directory / "head.safetensors"))
        # Heads saved before ensembles kept their one MLP under "net."; it is member 0 now.
        state = {("nets.0." + k[4:] if k.startswith("net.") else k): v for k, v in state.items()}
        head.load_state_dict(state)
        return cls(encoder, head, cfg, version)


class UntrainedReward:
    """What the learned reward serves before any model was promoted: a neutral 0 for everything."""

    kind = "learned"
    version = ""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Zeros: no preference learned yet."""
        return [0.0] * len(completions)
