"""Data parallelism for a PPO round over torch.distributed: N ranks share a batch, one result.

Every rank holds the whole round's samples and scores (small: token ids and floats). The expensive
parts are split by rows and their results shared:

- `measure`: rank r computes log-probs, reference log-probs and values for rows r, r+N, r+2N, …;
  the rows are gathered back into the whole [B, T] tensors on every rank, so the advantages
  (whitened over the whole batch) are the same everywhere, as on one process.
- `update`: the minibatches are drawn from the same permutation on every rank (the same seed); each
  rank runs forward/backward on its share of a minibatch's rows, the gradients are summed over the
  ranks (each rank scaled its loss by its rows' share of the minibatch), and every rank takes the
  same optimizer step on the same gradient: the weights stay identical, with no broadcast. Early
  stopping on approximate KL reads the mean over all ranks.

So a round on N ranks computes what it computes on one, up to the order of floating-point sums
(tests/distributed: world size 1 vs 2, same samples and seeds). `gloo` on CPU, `nccl` on GPU; one
process without torchrun is `SINGLE`, which does no communication at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rlhf_online.errors import Unavailable

log = logging.getLogger(__name__)


class RanksLost(Unavailable):
    """A collective failed: another rank of this trainer is gone, and the group cannot go on without it.

    The process should exit (non-zero) so that its supervisor, torchrun or Kubernetes, starts the
    group again: gloo and nccl groups cannot take a rank back in.
    """


def _collective(fn: Callable[[], Any]) -> Any:
    """Run one collective; a failure (a peer closed its connection, a timeout) is RanksLost."""
    try:
        return fn()
    except RuntimeError as e:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        # The backend's message names its source files and peers' addresses: the log keeps it, callers get ours.
        log.error("collective failed", extra={"error": str(e)})
        raise RanksLost(f"a collective failed on rank {dist.get_rank()} of {dist.get_world_size()}: another rank "
                        "of this trainer is gone; the trainer exits so that the group is started again") from e


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one trainer."""

    rank: int = 0
    world: int = 1

    @property
    def is_leader(self) -> bool:
        """Rank 0: serves the API, talks to the reward service, publishes."""
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a list of row indices: every world-th, from its rank."""
        return rows[self.rank::self.world]

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the ranks, in place (nothing with one rank)."""
        if self.world > 1:
            for t in tensors:
                _collective(lambda t=t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def gather_rows(self, part: torch.Tensor, rows: int) -> torch.Tensor:
        """Every rank's `share` of `rows` rows, back in row order: rank r's i-th row is row r + i*world."""
        if self.world == 1:
            return part
        per_rank = -(-rows // self.world)  # ceil: ranks past the end hold one row fewer
        padded = torch.zeros((per_rank, *part.shape[1:]), dtype=part.dtype, device=part.device)  # nccl: on the GPU
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        _collective(lambda: dist.all_gather(parts, padded))
        out = torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
        for r, p in enumerate(parts):
            n = len(range(r, rows, self.world))
            out[r::self.world] = p[:n]
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (others pass anything, e.g. None)."""
        if self.world == 1:
            return obj
        box = [obj]
        _collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]


SINGLE = Ranks()


def from_environment(backend: str = "") -> Ranks:
    """The ranks torchrun started (WORLD_SIZE > 1: joins the process group), else SINGLE.

    `backend` "" picks nccl where CUDA is available and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        if torch.cuda.is_available() and backend in ("", "nccl"):
            # One GPU per local rank: "cuda" (the device setting) then means this rank's own, and nccl's
            # collectives run there.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # The other ranks wait in a collective for rank 0's next round, as long as rounds are apart; a
        # rank that dies closes its connections, so the others' next collective fails (RanksLost) and
        # they exit for their supervisor to start the group again.
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                timeout=timedelta(days=7))
    return Ranks(dist.get_rank(), dist.get_world_size())
