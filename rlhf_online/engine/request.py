"""What a client asks the engine for, and the handle through which it gets the answer back."""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_online.errors import DeadlineExceeded, InvalidArgument, RlhfError

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class Limits:
    """Bounds a request must fit in; violations are INVALID_ARGUMENT naming the field."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_n: int = 8
    max_stop_strings: int = 8
    max_stop_length: int = 64
    max_temperature: float = 5.0


def validate_params(p: SamplingParams, n: int, limits: Limits) -> None:
    """Raise InvalidArgument naming the first out-of-range field."""
    if not 1 <= p.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument("params.max_new_tokens", f"must be in 1..{limits.max_new_tokens}, got {p.max_new_tokens}")
    if not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= limits.max_temperature):
        raise InvalidArgument("params.temperature", f"must be in [0, {limits.max_temperature}], got {p.temperature}")
    if not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        raise InvalidArgument("params.top_p", f"must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise InvalidArgument("params.top_k", f"must be >= 0, got {p.top_k}")
    if p.seed is not None and not 0 <= p.seed < 2**63:
        raise InvalidArgument("params.seed", f"must be in [0, 2^63), got {p.seed}")
    if len(p.stop) > limits.max_stop_strings:
        raise InvalidArgument("params.stop", f"at most {limits.max_stop_strings} stop strings, got {len(p.stop)}")
    for s in p.stop:
        if not s or len(s) > limits.max_stop_length:
            raise InvalidArgument("params.stop", f"each stop string must have 1..{limits.max_stop_length} characters")
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument("n", f"must be in 1..{limits.max_n}, got {n}")


@dataclass
class TextEvent:
    """New text of candidate `index` and the tokens behind it; `finish_reason` is set on its last event."""

    index: int
    delta: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()  # tokens sampled since the previous event (the EOS token included)


@dataclass(frozen=True)
class CandidateResult:
    """One finished candidate."""

    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: tuple[int, ...] = ()


_ids = itertools.count()
_DONE = object()


@dataclass
class GenerationRequest:
    """A tokenized request; each candidate is pinned to the policy version it was admitted with."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    deadline: float | None = None  # time.monotonic() seconds; None = no deadline
    versions: tuple[str, ...] = ()  # one per candidate, set by the engine at submission ("" = bare base)
    canary: str = ""  # the canary version when a candidate runs on it, set by the engine at submission
    request_id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    remaining: int = 0  # candidates not yet finished, kept by the engine
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # Where events go instead of `events` (e.g. onto an asyncio loop); called on the engine thread.
    sink: Callable[[Any], None] | None = field(default=None, repr=False)

    def emit(self, item: Any) -> None:
        """Hand an event, an error or the end marker to the consumer."""
        if self.sink is not None:
            self.sink(item)
        else:
            self.events.put(item)

    def expired(self, now: float) -> bool:
        """True once the client's deadline has passed."""
        return self.deadline is not None and now >= self.deadline


class RequestHandle:
    """The caller's side of a submitted request: stream events, wait for results, cancel."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request

    @property
    def version(self) -> str:
        """The policy version of the first candidate ("" = bare base); every one's in `versions`."""
        return self.request.versions[0] if self.request.versions else ""

    @property
    def versions(self) -> tuple[str, ...]:
        """The policy version of each candidate, in index order (interleaved under a canary)."""
        return self.request.versions

    def cancel(self) -> None:
        """Stop generating for this request; its batch slots are freed at the next step."""
        self.request.cancelled.set()

    def events(self) -> Iterator[TextEvent]:
        """Yield text events as tokens are produced; raises the engine's error if the request failed."""
        while True:
            timeout = None
            if self.request.deadline is not None:
                # A little slack past the deadline: the engine itself reports DeadlineExceeded.
                timeout = max(0.0, self.request.deadline - time.monotonic()) + 5.0
            try:
                item = self.request.events.get(timeout=timeout)
            except queue.Empty:
                self.cancel()
                raise DeadlineExceeded("deadline passed while waiting for the engine") from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> list[CandidateResult]:
        """Block until every candidate is finished and return them in index order."""
        collector = ResultCollector(self.request.n)
        for ev in self.events():
            collector.add(ev)
        return collector.results()


class ResultCollector:
    """Assembles streamed events into finished candidates."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._texts: dict[int, list[str]] = {}
        self._ids: dict[int, list[int]] = {}
        self.done: dict[int, CandidateResult] = {}

    def add(self, ev: TextEvent) -> CandidateResult | None:
        """Take one event; return the candidate's result if this event finished it."""
        self._texts.setdefault(ev.index, []).append(ev.delta)
        self._ids.setdefault(ev.index, []).extend(ev.token_ids)
        if ev.finish_reason is None:
            return None
        result = CandidateResult("".join(self._texts[ev.index]), ev.finish_reason, ev.completion_tokens,
                                 tuple(self._ids[ev.index]))
        self.done[ev.index] = result
        return result

    def results(self) -> list[CandidateResult]:
        """All candidates in index order (every one must have finished)."""
        return [self.done[i] for i in range(self.n)]


def is_done(item: Any) -> bool:
    """True for the end-of-request marker."""
    return item is _DONE


def finish_request(request: GenerationRequest, error: RlhfError | BaseException | None = None) -> None:
    """Signal the consumer that the request ended, with an error if it failed."""
    if error is not None:
        request.emit(error)
    request.emit(_DONE)
