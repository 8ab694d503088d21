"""The PPO policy: base model + trainable LoRA + value head; the reference is the same model, adapter off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhf_online.engine import attention
from rlhf_online.ppo import prefix
from rlhf_online.ppo.config import PPOConfig

VALUE_HEAD_FILE = "value_head.safetensors"


def names_own_cache(model: Any) -> bool:
    """Whether the model's generation config names its own cache implementation (sliding or hybrid caches).

    Such a model keeps the cache it names: generate refuses a `past_key_values` beside it, and the
    passes do not hand it a plain DynamicCache for a shared prefix.
    """
    return getattr(getattr(model, "generation_config", None), "cache_implementation", None) is not None


class PolicyWithValue(nn.Module):
    """Logits and values of [query | response] sequences, and reference logits with the adapter disabled.

    With `compute_dtype` bfloat16 the body's matmuls run under autocast (bf16 products, fp32
    weights and gradients) while the vocabulary projection, the values and everything after them
    stay fp32: log-probs of the policy and of the reference, and so the PPO ratio and the KL, are
    read off fp32 logits of the same bf16 hidden states.
    """

    def __init__(self, base: Any, cfg: PPOConfig, adapter_dir: Path | None = None) -> None:
        super().__init__()
        from rlhf_online.models.provision import pick_dtype

        device = next(base.parameters()).device
        self.compute_dtype = pick_dtype(cfg.compute_dtype, device.type)
        self._device_type = device.type
        if adapter_dir is not None:
            # Warm start: continue from the served adapter (and its value head, if it has one).
            self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        else:
            self.model = get_peft_model(base, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))
        if self.compute_dtype != torch.float32:
            self._store_frozen_linears_in(self.compute_dtype)
        self.shared_prefix_min_tokens = cfg.shared_prefix_min_tokens
        self._caches_plainly = not names_own_cache(base)  # a sliding or hybrid cache keeps whole-row passes
        hidden = base.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if adapter_dir is not None and (Path(adapter_dir) / VALUE_HEAD_FILE).exists():
            self.value_head.load_state_dict(load_file(str(Path(adapter_dir) / VALUE_HEAD_FILE)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0,
                skip_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, keep or L, V], values [B, keep or L]) of the last `keep` positions (0 = all) of left-padded rows.

        Keeping only the response's positions spares the vocabulary projection (a fifth of SmolLM2's
        compute per position) on the prompt, which is most of a short reply's sequence. `skip_last`
        leaves out the very last of them (its logits predict a token after the reply): one position
        fewer [., V] rows, and no zero-filled gradient for a slice of them.
        """
        hidden = self._last_hidden(ids, mask, keep)  # [B, keep or L, H] fp32
        values = self.value_head(hidden).squeeze(-1)
        return self._logits(hidden, keep, skip_last), values

    @torch.no_grad()
    def reference_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0,
                         skip_last: bool = False) -> torch.Tensor:
        """Logits of the last `keep` positions (0 = all, `skip_last` as in forward) under the frozen reference."""
        with self.model.disable_adapter():
            return self._logits(self._last_hidden(ids, mask, keep), keep, skip_last)

    def _store_frozen_linears_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen body's linear weights in `dtype` (the LoRA weights, embeddings, norms and head stay fp32).

        Autocast would round exactly these weights to `dtype` in every pass anyway, so the passes compute
        the same; stored rounded, they are not cast again at every forward and every decoded token, and
        take half the memory. Embeddings and norms are not matmuls: autocast keeps them (and so the
        residual stream) in fp32, and so do we.
        """
        head = self.model.get_output_embeddings()
        for module in self.model.modules():
            if isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad:
                module.to(dtype)

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Decode under the passes' autocast, the vocabulary projection in fp32 (as `_logits` does), LoRA folded in.

        Rollouts then come from the same precision as the passes `measure` reads their log-probs
        from (bf16 products, fp32 logits), and a bf16-stored body decodes without casting its
        weights at every token. The attention is SDPA as in the passes, its masks built without vmap
        (engine.attention.fast_masks: the same masks, 3.5% of sampling's time at 8 rows x 32 tokens).
        """
        base = self.model.get_base_model()
        if self.compute_dtype == torch.float32:
            with self._lora_merged(), attention.fast_masks(base):
                yield
            return
        head = base.get_output_embeddings()
        base.set_output_embeddings(_Fp32Projection(head))
        try:
            with self._autocast(), self._lora_merged(), attention.fast_masks(base):
                yield
        finally:
            base.set_output_embeddings(head)

    @contextmanager
    def _lora_merged(self) -> Iterator[None]:
        """Each LoRA's delta folded into a copy of its frozen weight (in the weight's dtype), the adapter layers off.

        A decoded token then costs one matmul per adapted projection instead of three (base, A, B) and
        PEFT's per-layer Python: at 8 rows x 32 tokens, half of sampling's `linear` calls were LoRA's
        rank-16 A and B. The frozen weights themselves are never touched (a merged copy stands in, the
        original tensor is put back), so the passes after it read exactly what they read before. PEFT's
        merge_adapter/unmerge_adapter would subtract the delta again, which in bf16 does not give back
        the stored weights bit for bit.
        """
        from peft.tuners.lora import LoraLayer

        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for module in self.model.modules():
                    if not isinstance(module, LoraLayer) or not isinstance(module.base_layer, nn.Linear):
                        continue
                    weight = module.base_layer.weight
                    merged = weight.detach().float()
                    for name in module.active_adapters:
                        if name in module.lora_A:
                            merged = merged + module.get_delta_weight(name).float()
                    swapped.append((weight, weight.data))
                    weight.data = merged.to(weight.dtype)
            with self.model.disable_adapter():
                yield
        finally:
            for weight, original in swapped:
                weight.data = original

    def _autocast(self) -> Any:
        """The autocast context of the body's passes (a no-op in float32)."""
        return torch.autocast(self._device_type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def _attention_kernel(self) -> Any:
        """SDPA's math kernel for bf16 passes on the CPU, the default choice otherwise.

        On the CPU, the flash kernel's backward in bf16 took 9 ms a layer for 8 rows of ~70 tokens,
        a fifth of a PPO update; the math kernel's takes half as long, as close to fp32 (measured:
        sampled tokens' log-probs within 0.03 of fp32 on average with either kernel).
        """
        if self._device_type == "cpu" and self.compute_dtype != torch.float32:
            return sdpa_kernel([SDPBackend.MATH])
        return nullcontext()

    def _last_hidden(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """The final (normed) hidden states [B, keep or L, H] of the last `keep` positions (0 = all), in fp32.

        Rows are left-padded. When `keep` leaves room for it, the tokens every row starts with (the
        chat template's system prompt) run once as one row and the rest of each row after them
        (ppo.prefix): the bench's 8 rows of 73 SmolLM2 tokens become 24 + 8 x 49.
        """
        shared = None
        if keep and self._caches_plainly:
            shared = prefix.split(ids, mask, ids.shape[1] - keep, self.shared_prefix_min_tokens)
        with self._autocast(), self._attention_kernel():
            # logits_to_keep=1: the model's own projection covers one position; ours, in fp32, the ones wanted.
            if shared is None:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 output_hidden_states=True, logits_to_keep=1)
            else:
                length, rows = shared.ids.shape[0], ids.shape[0]
                positions = torch.arange(length, device=ids.device).unsqueeze(0)
                cache = self.model(input_ids=shared.ids.unsqueeze(0), position_ids=positions, use_cache=True,
                                   logits_to_keep=1).past_key_values
                cache.batch_repeat_interleave(rows)  # [1, heads, P, d] -> [B, heads, P, d] in every layer
                out = self.model(input_ids=shared.rest_ids, position_ids=shared.rest_positions,
                                 attention_mask=torch.cat([mask.new_ones(rows, length), shared.rest_mask], 1),
                                 past_key_values=cache, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        return (hidden[:, -keep:] if keep else hidden).float()

    def _logits(self, hidden: torch.Tensor, keep: int, skip_last: bool = False) -> torch.Tensor:
        """fp32 logits [B, keep or L (less one if skip_last), V] of the last `keep` positions (0 = all)."""
        head = self.model.get_output_embeddings()
        start, end = hidden.shape[1] - keep if keep else 0, hidden.shape[1] - int(skip_last)
        # contiguous: torch's CPU linear of a strided slice under a frozen weight runs as a bmm over a copy of the
        # weight per row (load_model's head hook says more): measuring 8 rollouts took 1.75 s with the slice, 1.48 s.
        chosen = hidden if (start, end) == (0, hidden.shape[1]) else hidden[:, start:end].contiguous()
        weight = head.weight.float()
        if self.compute_dtype != torch.float32 and chosen.requires_grad and not weight.requires_grad:
            logits = _ProjectionGradInHalf.apply(chosen, weight, self._head_weight_in(self.compute_dtype))
        else:
            logits = nn.functional.linear(chosen, weight)
        return logits if head.bias is None else logits + head.bias.float()

    def _head_weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen output projection's weight in `dtype` (its backward's operand, see _ProjectionGradInHalf).

        Made again whenever the weight is another tensor, on another device, or written in place
        (its version counter), so a copy never outlives what it was made from.
        """
        weight = self.model.get_output_embeddings().weight
        key = (weight.data_ptr(), weight.device, weight._version, dtype)
        cached = getattr(self, "_head_half", None)
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().to(dtype))
            self._head_half = cached
        return cached[1]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights and the value head; the base stays frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable weights (LoRA and value head): a few MB, where a model copy would be hundreds."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Take these trainable weights (a `trainable_state()` of a policy with the same LoRA layout)."""
        params = dict(self.named_parameters())
        for n, w in state.items():
            params[n].copy_(w)

    @contextmanager
    def using(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run with other trainable weights for a while (e.g. the served version's, to compare a candidate with it)."""
        own = self.trainable_state()
        self.load_trainable(state)
        try:
            yield
        finally:
            self.load_trainable(own)

    def save(self, directory: Path) -> None:
        """The PEFT adapter files plus the value head, for publishing and for the next round's warm start."""
        self.model.save_pretrained(str(directory))
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(directory / VALUE_HEAD_FILE))


class _ProjectionGradInHalf(torch.autograd.Function):
    """fp32 logits = hidden @ W.T of a frozen W; the gradient to `hidden` as a product in the body's compute dtype.

    The logits stay fp32 (the ratio and the KL are read off them), but their gradient flows on into
    a body whose every backward product autocast already runs in bf16. Back through SmolLM2's 49k x
    576 projection, 256 positions took 48.6 ms as an fp32 product and 14.9 ms in bf16 (AMX Xeon):
    a tenth of an update's four epochs.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                weight_half: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (fp32) of hidden [..., H] (fp32) under weight [V, H] (fp32)."""
        ctx.save_for_backward(weight_half)
        return nn.functional.linear(hidden, weight)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """d/d hidden = grad @ W, the product in the weight copy's dtype, returned in fp32; W itself is frozen."""
        (weight_half,) = ctx.saved_tensors
        return torch.matmul(grad.to(weight_half.dtype), weight_half).float(), None, None


class _Fp32Projection(nn.Module):
    """An output projection that runs outside autocast: fp32 logits from the same (shared, tied) weights."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] in fp32."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float())
