"""A batch on several LoRA versions in two matmuls per adapted layer, however many versions it holds.

With every version active, PEFT's layer adds `B_k(A_k(x)) * scaling_k` for each version k: at two
versions that is four more operations in each of SmolLM2's 120 adapted projections per step than
on one. Measured on a decode step of 2-16 rows (SmolLM2 bf16, 2 threads, AMX Xeon): 41-50 ms on one
version, 11-12% more on two (docs/benchmarks.md), a cost every request in flight during a swap paid
while the old version's rows finished, and every step of a canary beside a stable adapter.

Here the versions' A matrices are stacked into A_cat [sum r, in] and their B matrices into
B_cat [out, sum r]; a per-row mask [rows, 1, sum r] keeps each row's own block, scaled by its
version's scaling, and zeroes the others (all of them for a row on the bare base):

    delta = ((x @ A_cat^T) * mask) @ B_cat^T

PEFT's sum up to rounding (zeros for the other versions' terms; the scaling applied before B rather
than after), in the LoRA weights' dtype as PEFT computes it, added to the base projection's output
and cast back as PEFT does. The LoRA layers are switched off for the pass and a forward hook on each
adds its delta.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class MixedLora:
    """The stacked A and B matrices of `names` in every LoRA layer, ready to run rows of any of them together."""

    @torch.no_grad()
    def __init__(self, layers: dict[str, Any], names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.layers = layers
        # Each version's columns: (first, end, scaling); its rank and scaling are the same in every layer
        # it adapts (a plain `lora_slots` signature has no per-module ranks or alphas).
        self.blocks: dict[str, tuple[int, int, float]] = {}
        self.rank = 0  # columns so far: every version's block ends where the next begins
        for layer_name, layer in layers.items():
            for n in self.names:
                if n not in layer.lora_A:
                    continue
                rank, scaling = layer.lora_A[n].weight.shape[0], float(layer.scaling[n])
                if n not in self.blocks:
                    self.blocks[n] = (self.rank, self.rank + rank, scaling)
                    self.rank += rank
                elif self.blocks[n][1] - self.blocks[n][0] != rank or self.blocks[n][2] != scaling:
                    raise ValueError(f"LoRA layer {layer_name}: version {n} has another rank or scaling there")
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer name -> (A_cat [R, in], B_cat [out, R])
        for layer_name, layer in layers.items():
            own = [n for n in self.blocks if n in layer.lora_A]
            if not own:
                continue
            ref = layer.lora_A[own[0]].weight
            a = ref.new_zeros(self.rank, ref.shape[1])  # a version this layer does not adapt keeps zero columns
            b = ref.new_zeros(layer.lora_B[own[0]].weight.shape[0], self.rank)
            for n in own:
                first, end, _ = self.blocks[n]
                a[first:end] = layer.lora_A[n].weight
                b[:, first:end] = layer.lora_B[n].weight
            self.stacked[layer_name] = (a, b)

    def mask(self, adapters: Sequence[str]) -> torch.Tensor:
        """[rows, 1, R]: row i's version's scaling on that version's columns, 0 elsewhere (a base row: all 0)."""
        a = next(iter(self.stacked.values()))[0]
        mask = torch.zeros(len(adapters), 1, self.rank, dtype=a.dtype)  # on the CPU: rows are filled one by one
        for row, name in enumerate(adapters):
            if name in self.blocks:
                start, end, scaling = self.blocks[name]
                mask[row, 0, start:end] = scaling
        return mask.to(a.device)  # one device: the engine's model is not split across devices

    @contextmanager
    def applied(self, adapters: Sequence[str]) -> Iterator[None]:
        """Within: each LoRA layer (its adapters switched off by the caller) adds its rows' deltas to the base output."""
        if not self.stacked:  # no layer holds any of the versions: the base output as it is
            yield
            return
        mask = self.mask(adapters)
        handles = [self.layers[name].register_forward_hook(_adds_delta(a, b, mask))
                   for name, (a, b) in self.stacked.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _adds_delta(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> Any:
    """A forward hook: base output [B, T, out] + ((x @ a^T) * mask) @ b^T, computed in a's dtype (PEFT's)."""

    def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a.dtype)
        delta = torch.matmul(torch.matmul(x, a.t()) * mask, b.t())
        return (output + delta).to(output.dtype)

    return hook
