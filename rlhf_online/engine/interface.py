"""What a serving engine offers the API front-ends and the adapter watcher, whichever engine it is.

Two engines implement it: the embedded one (`engine.Engine`, continuous batching over transformers'
KV cache, the default) and vLLM's (`vllm_engine.VllmEngine`, `--engine vllm`). The frontend, both
APIs and the watcher talk only to this class: tokenize a request, submit it with its sampling
params and policy versions, stream its events through the returned handle, cancel it; load a
version, make it current or canary, drain, stop. Prompt encoding lives here because both engines
tokenize the same way (the model's own tokenizer and chat template), so a completion's prompt ids
do not depend on the engine that served it.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_online import metrics
from rlhf_online.engine.request import GenerationRequest, Limits, RequestHandle, SamplingParams
from rlhf_online.errors import InvalidArgument
from rlhf_online.models.chat import chat_ids

CHAT_ROLES = ("system", "user", "assistant")
# What a client is told when a forward pass fails: the cause (a torch message, maybe paths) stays in the log.
GENERATION_FAILED = "generation failed on the server; the cause is in its log"


@dataclass
class EngineConfig:
    """Capacity and limits of one engine."""

    max_batch_size: int = 32  # rows decoded together
    # KV-cache positions the padded batch may hold: rows x the longest row's prompt + max_new_tokens.
    # 65,536 is 1.5 GB of bf16 cache for SmolLM2-135M (23 KB a position); admission waits when it is full.
    max_batch_tokens: int = 65536
    max_queue: int = 64  # requests waiting for a slot before RESOURCE_EXHAUSTED
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step, so one burst cannot stall decoding
    limits: Limits = field(default_factory=Limits)


def eos_ids_of(tokenizer: Any, generation_config: Any) -> set[int]:
    """Token ids that end a candidate: the tokenizer's EOS and the generation config's (one id or a list)."""
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    return {e for e in eos if e is not None}


class ServingEngine(abc.ABC):
    """Generation from one base model and its resident LoRA versions, for many concurrent requests.

    The version bookkeeping is shared: which version is stable, which is canary, which are loaded
    and which are retired (replaced, unloaded by the engine once no request runs on them).
    """

    tokenizer: Any
    config: EngineConfig
    eos_ids: set[int]  # token ids that end a candidate
    max_context: int  # prompt + generated tokens one row may hold

    def __init__(self) -> None:
        self._lock: threading.Lock | threading.Condition = threading.Lock()  # guards what follows
        self._current = ""  # policy version new requests get; "" = bare base
        self._canary = ""  # the version a share of requests gets instead (chosen by the caller); "" = none
        self._adapters: dict[str, Any] = {}  # version -> the engine's handle on it (a PEFT name, a LoRARequest)
        self._retired: set[str] = set()  # versions no longer current or canary: unloaded once nothing uses them
        self._draining = False  # new requests refused, admitted ones finish
        self._stopping = False  # everything refused, what runs is failed
        for role in ("stable", "canary"):  # the bare base and no canary until the watcher says otherwise
            metrics.POLICY_VERSION.labels(role).set(0)

    # ---------------------------------------------------------------- lifecycle

    @abc.abstractmethod
    def start(self) -> ServingEngine:
        """Run the engine in the background (tests, in-process use); returns once it takes requests."""

    @abc.abstractmethod
    def run(self) -> None:
        """Serve in the calling thread (servers: the main thread) until stop()."""

    @abc.abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop; requests still queued or running fail with UNAVAILABLE."""

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE) but finish the ones already admitted."""
        with self._lock:
            self._draining = True

    # ---------------------------------------------------------------- what it serves

    @property
    def policy_version(self) -> str:
        """The version new requests are pinned to ("" = bare base)."""
        return self._current

    @property
    def canary_version(self) -> str:
        """The canary version callers may pin requests to besides the current one ("" = none)."""
        return self._canary

    @property
    @abc.abstractmethod
    def busy(self) -> int:
        """Requests queued or running."""

    @property
    @abc.abstractmethod
    def dtype_name(self) -> str:
        """The weights' dtype as clients see it: "float32", "bfloat16", ..."""

    @property
    @abc.abstractmethod
    def device_type(self) -> str:
        """"cpu" or "cuda"."""

    @property
    @abc.abstractmethod
    def module_tree(self) -> Any:
        """A torch module with the base model's layer names and shapes, for checking an adapter fits it."""

    # ---------------------------------------------------------------- requests

    @abc.abstractmethod
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               deadline: float | None = None, sink: Callable[[Any], None] | None = None,
               route: Callable[[str, str], Sequence[str]] | None = None) -> RequestHandle:
        """Queue a request; raises RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when draining.

        Every candidate runs on the current version, or, with `route`, on the version
        `route(current, canary)[i]` names, chosen atomically with the versions served at that instant;
        they stay loaded while the request runs. Events go to the handle's queue, or to `sink`.
        """

    # ---------------------------------------------------------------- versions

    @abc.abstractmethod
    def load_adapter(self, version: str, path: Path, timeout: float = 120.0) -> None:
        """Load a PEFT adapter as `version` beside the ones serving (validated by the caller)."""

    def set_current(self, version: str) -> None:
        """New requests go to `version` (loaded already, or "" for the bare base)."""
        self._assign("stable", version)

    def set_canary(self, version: str) -> None:
        """Let callers pin requests to `version` (loaded already) besides the current one; "" = no canary."""
        self._assign("canary", version)

    def loaded_versions(self) -> list[str]:
        """Adapter versions resident now."""
        with self._lock:
            return sorted(self._adapters)

    def _assign(self, role: str, version: str) -> None:
        """Make `version` the stable or the canary version; the one it replaces is retired unless the other role has it."""
        with self._lock:
            if version and version not in self._adapters:
                raise InvalidArgument("version", f"{version} is not loaded")
            old, other = (self._current, self._canary) if role == "stable" else (self._canary, self._current)
            if old and old not in (version, other):
                self._retired.add(old)  # replaced or rolled back: unloaded once its requests finish
            self._retired.discard(version)  # a rollback may bring a retired version back
            if role == "stable":
                self._current = version
            else:
                self._canary = version
            metrics.POLICY_VERSION.labels(role).set(metrics.version_number(version))
            self._assigned()

    @abc.abstractmethod
    def _assigned(self) -> None:
        """Called under the lock after a role changed: wake whatever unloads retired versions."""

    def _route(self, req: GenerationRequest, route: Callable[[str, str], Sequence[str]] | None) -> None:
        """Pin each candidate of `req` to the current version or to what `route` picks (the lock held)."""
        versions = tuple(route(self._current, self._canary)) if route else (self._current,) * req.n
        if len(versions) != req.n or not set(versions) <= {self._current, self._canary}:
            raise ValueError(f"route gave {versions} for {req.n} candidates; want current or canary versions")
        req.versions = versions
        req.canary = self._canary if self._canary and self._canary in versions else ""

    # ---------------------------------------------------------------- prompts (shared)

    def encode_prompt(self, prompt: str, field: str = "prompt") -> list[int]:
        """A plain prompt is one user turn of the chat template (the policy is a chat model)."""
        if not prompt.strip():
            raise InvalidArgument(field, "must not be empty")
        return self._encode([{"role": "user", "content": prompt}], field)

    def encode_raw(self, text: str, field: str = "inputs") -> list[int]:
        """Text sent to the model as is (it carries its own chat markup, if any)."""
        if not text.strip():
            raise InvalidArgument(field, "must not be empty")
        return self._within_limit(field, len(text), lambda: self.tokenizer.encode(text, add_special_tokens=False))

    def encode_messages(self, messages: list[tuple[str, str]]) -> list[int]:
        """Chat messages through the tokenizer's chat template, ending with the assistant's turn."""
        if not messages:
            raise InvalidArgument("messages", "must not be empty")
        for i, (role, content) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
            if not content.strip():
                raise InvalidArgument(f"messages[{i}].content", "must not be empty")
        return self._encode([{"role": r, "content": c} for r, c in messages], field="messages")

    def _encode(self, messages: list[dict], field: str) -> list[int]:
        """Tokenize through the chat template and enforce the prompt-length limit."""
        return self._within_limit(field, sum(len(m["content"]) for m in messages),
                                  lambda: chat_ids(self.tokenizer, messages))

    def _within_limit(self, field: str, chars: int, tokenize: Callable[[], list[int]]) -> list[int]:
        """Token ids of a prompt, or InvalidArgument naming `field` when it is over the limit."""
        limit = self.config.limits.max_prompt_tokens
        # Characters bound tokens from above for this tokenizer (>= 1 char a token), so a huge
        # prompt is refused without tokenizing megabytes; the exact check follows.
        if chars > 16 * limit:
            raise InvalidArgument(field, f"too long: {chars} characters; the limit is {limit} tokens")
        ids = tokenize()
        if len(ids) > limit:
            raise InvalidArgument(field, f"too long: {len(ids)} tokens; the limit is {limit}")
        return ids
