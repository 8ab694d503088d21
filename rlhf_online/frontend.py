"""What every API front-end (gRPC, TGI-compatible HTTP) does around the engine.

Validate and submit a request, hand its text to the caller as it is generated, log every candidate
with the policy version that produced it before the caller sees the end (so feedback sent right
after a reply or a stream always finds its completion), cancel it when the caller goes away, take
feedback, preferences and rankings. The API layers only translate their wire format to and from these calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_online import metrics
from rlhf_online.auth.guard import FeedbackGuard
from rlhf_online.auth.keys import Identity, KeyAuthenticator
from rlhf_online.canary.routing import CanaryRouter
from rlhf_online.engine.interface import ServingEngine
from rlhf_online.engine.request import (
    CandidateResult,
    Limits,
    RequestHandle,
    ResultCollector,
    SamplingParams,
    TextEvent,
    is_done,
)
from rlhf_online.errors import InvalidArgument
from rlhf_online.store import CompletionRecord, Store

MAX_ID_CHARS, MAX_COMMENT_CHARS, MAX_METADATA_ITEMS, MAX_METADATA_CHARS = 128, 4096, 32, 1024


class Abandoned(Exception):
    """The job was cancelled before every candidate finished: nobody waits for its answer.

    Not a domain error on purpose: the call already ended on the client's side, so the API layer
    records it as the client's doing, not as a server failure.
    """


@dataclass(frozen=True)
class Update:
    """New text of one candidate; `result` is set on its last update, which comes only after logging."""

    index: int
    completion_id: str
    delta: str
    token_ids: tuple[int, ...]  # tokens sampled since the previous update (the EOS token included)
    result: CandidateResult | None = None


@dataclass(frozen=True)
class ServingInfo:
    """What a server tells clients about the model it serves and its limits."""

    dtype: str
    device_type: str
    max_batch_size: int
    max_queue: int
    limits: Limits
    policy_version: str


@dataclass
class Job:
    """A submitted generation: its completion ids, its engine handle, and what to log when it finishes.

    Leaving `with job:` cancels it (a no-op once finished), so a caller that goes away frees its slots.
    """

    prompt: str
    messages: tuple[tuple[str, str], ...]
    params: SamplingParams
    prompt_tokens: int
    completion_ids: list[str]
    handle: RequestHandle
    user_id: str
    metadata: dict[str, str]
    prompt_ids: tuple[int, ...] = ()  # what the model was given, logged so a trainer can re-read it exactly
    tenant: str = ""  # the caller's API key's tenant ("" with authentication off)
    inbox: asyncio.Queue | None = None  # engine events handed onto an event loop (see Frontend.submit)
    _collector: ResultCollector = field(init=False, repr=False)
    _last: dict[int, Update] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._collector = ResultCollector(len(self.completion_ids))

    @property
    def versions(self) -> tuple[str, ...]:
        """The policy version of each candidate, in index order."""
        return self.handle.versions

    @property
    def version(self) -> str:
        """The version this job's user was routed to: the canary if any candidate came from it, else the stable one."""
        return self.canary or self.handle.version

    @property
    def canary(self) -> str:
        """The canary version if one of the candidates came from it, else ""."""
        return self.handle.request.canary

    def cancel(self) -> None:
        """Stop generating; the engine frees the job's batch slots at its next step."""
        self.handle.cancel()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    @property
    def finished(self) -> bool:
        """True once every candidate has its result."""
        return len(self._collector.done) == len(self.completion_ids)

    def take(self, ev: TextEvent) -> Update | None:
        """An engine event as an update to pass on now, or None for a candidate's last (held until logged)."""
        result = self._collector.add(ev)
        update = Update(ev.index, self.completion_ids[ev.index], ev.delta, ev.token_ids, result)
        if result is None:
            return update
        self._last[ev.index] = update
        return None

    def results(self) -> list[CandidateResult]:
        """Every candidate's result, in index order (all must have finished)."""
        return self._collector.results()

    def last_updates(self) -> list[Update]:
        """Every candidate's last update, in index order (all must have finished)."""
        return [self._last[i] for i in range(len(self.completion_ids))]

    async def events_async(self) -> AsyncIterator[TextEvent]:
        """Engine events from the event loop's inbox; raises the engine's error if the request failed."""
        if self.inbox is None:
            raise RuntimeError("the job was submitted without an event loop: use Frontend.stream")
        while True:
            item = await self.inbox.get()
            if is_done(item):
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Frontend:
    """The engine plus the completion log: the generation lifecycle and the checks both APIs share."""

    def __init__(self, engine: ServingEngine, store: Store, router: CanaryRouter | None = None,
                 guard: FeedbackGuard | None = None, authenticator: KeyAuthenticator | None = None) -> None:
        self.engine, self.store = engine, store
        self.router = router or CanaryRouter()  # which candidates a canary serves, while there is one
        self.guard = guard or FeedbackGuard(store)  # rate limits and who may rate what
        self.authenticator = authenticator  # None: API keys are not required (and not read)
        self.eos_ids = frozenset(engine.eos_ids)  # token ids that end a candidate (TGI marks them special)

    # ------------------------------------------------------------ what the APIs tell clients

    @property
    def policy_version(self) -> str:
        """The stable version new requests are served from ("" = bare base)."""
        return self.engine.policy_version

    @property
    def canary_version(self) -> str:
        """The canary version a share of users is served instead ("" = none)."""
        return self.engine.canary_version

    def info(self) -> ServingInfo:
        """The served model and the limits requests must fit in."""
        engine = self.engine
        return ServingInfo(dtype=engine.dtype_name, device_type=engine.device_type, max_batch_size=engine.config.max_batch_size,
                           max_queue=engine.config.max_queue, limits=engine.config.limits,
                           policy_version=engine.policy_version)

    def identify(self, presented: str) -> Identity | None:
        """The caller of a presented API key when keys are required (Unauthenticated if it is not valid)."""
        return self.authenticator.identify(presented) if self.authenticator else None

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens spelled out)."""
        return self.engine.tokenizer.decode([token_id])

    def has_special_tokens(self, text: str) -> bool:
        """True when the text carries the model's own markup (a prompt already in chat format)."""
        return any(t in text for t in self.engine.tokenizer.all_special_tokens)

    # ------------------------------------------------------------ the generation lifecycle

    def submit(self, *, prompt: str = "", messages: tuple[tuple[str, str], ...] = (), raw: bool = False,
               params: SamplingParams, n: int = 1, user_id: str = "", metadata: dict[str, str] | None = None,
               deadline: float | None = None, loop: asyncio.AbstractEventLoop | None = None,
               prompt_field: str = "prompt", identity: Identity | None = None) -> Job:
        """Validate and queue a request; `raw` sends the prompt without the chat template.

        With `loop`, the engine thread hands events onto that event loop (for `stream_async`), else
        they wait on the job's handle (for `stream`). `prompt_field` is the name the caller's API
        gives the prompt, used in error messages.
        """
        metadata = dict(metadata or {})
        if bool(prompt) == bool(messages):
            raise InvalidArgument(prompt_field, "set exactly one of prompt and messages")
        check_length("user_id", user_id, MAX_ID_CHARS)
        if len(metadata) > MAX_METADATA_ITEMS:
            raise InvalidArgument("metadata", f"at most {MAX_METADATA_ITEMS} entries")
        if any(len(k) + len(v) > MAX_METADATA_CHARS for k, v in metadata.items()):
            raise InvalidArgument("metadata", f"each key plus value at most {MAX_METADATA_CHARS} characters")
        if messages:
            prompt_ids = self.engine.encode_messages(list(messages))
        elif raw:
            prompt_ids = self.engine.encode_raw(prompt, prompt_field)
        else:
            prompt_ids = self.engine.encode_prompt(prompt, prompt_field)
        inbox: asyncio.Queue | None = None
        sink = None
        submitted: list[RequestHandle] = []
        if loop is not None:
            inbox = asyncio.Queue()

            def sink(item: Any) -> None:  # runs on the engine thread
                try:
                    loop.call_soon_threadsafe(inbox.put_nowait, item)
                except RuntimeError:  # the caller's event loop is closed: nobody reads this request any more
                    for h in submitted:
                        h.cancel()  # evicted at the next step, instead of failing the whole batch's step

        handle = self.engine.submit(prompt_ids, params, n=n, deadline=deadline, sink=sink,
                                    route=lambda stable, canary: self.router.versions(user_id, n, stable, canary))
        submitted.append(handle)
        ids = [f"cmpl-{uuid.uuid4().hex}" for _ in range(n)]
        return Job(prompt, tuple(messages), params, len(prompt_ids), ids, handle, user_id, metadata, tuple(prompt_ids),
                   identity.tenant if identity else "", inbox)

    def stream(self, job: Job) -> Iterator[Update]:
        """Updates as tokens arrive; every candidate's last one only after all of them are logged."""
        with job:
            for ev in job.handle.events():
                update = job.take(ev)
                if update is not None:
                    yield update
                elif job.finished:
                    self.log(job, job.results())
                    yield from job.last_updates()
                    return
        raise Abandoned("the job was cancelled before it finished")

    async def stream_async(self, job: Job) -> AsyncIterator[Update]:
        """`stream` on an event loop (the job was submitted with `loop`); the store is written off the loop."""
        with job:
            async for ev in job.events_async():
                update = job.take(ev)
                if update is not None:
                    yield update
                elif job.finished:
                    await asyncio.to_thread(self.log, job, job.results())
                    for last in job.last_updates():
                        yield last
                    return
        raise Abandoned("the job was cancelled before it finished")

    def generate(self, job: Job) -> list[CandidateResult]:
        """Wait for every candidate, log them all, and return them in index order."""
        return [u.result for u in self.stream(job) if u.result is not None]

    async def generate_async(self, job: Job) -> list[CandidateResult]:
        """`generate` on an event loop."""
        return [u.result async for u in self.stream_async(job) if u.result is not None]

    def log(self, job: Job, results: list[CandidateResult]) -> None:
        """Write every candidate to the store with the version that produced it."""
        p = job.params
        params = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                  "top_k": p.top_k, "seed": p.seed, "stop": list(p.stop), "n": len(results)}
        now = time.time()
        self.store.add_completions([
            CompletionRecord(completion_id=cid, prompt=job.prompt, messages=job.messages, text=r.text,
                             policy_version=version, user_id=job.user_id, params=params,
                             prompt_tokens=job.prompt_tokens, completion_tokens=r.completion_tokens,
                             finish_reason=r.finish_reason, metadata=job.metadata, created_at=now,
                             prompt_token_ids=job.prompt_ids, token_ids=r.token_ids, tenant=job.tenant)
            for cid, r, version in zip(job.completion_ids, results, job.versions, strict=True)])
        metrics.COMPLETIONS_LOGGED.inc(len(results))

    def feedback(self, completion_id: str, rating: str, user_id: str = "", comment: str = "",
                 identity: Identity | None = None) -> bool:
        """Record a rating; False (and counted once) when this user already rated this completion.

        The store checks the rating before anything is written.
        """
        check_id("completion_id", completion_id)
        check_length("user_id", user_id, MAX_ID_CHARS)
        check_length("comment", comment, MAX_COMMENT_CHARS)
        rater = self.guard.check(identity, user_id, {"completion_id": completion_id})
        new = self.store.add_feedback(completion_id, user_id, rating, comment, rater)
        if new:
            metrics.FEEDBACK.labels(rating).inc()
        else:
            metrics.FEEDBACK_DUPLICATES.inc()
        return new

    def preference(self, chosen_completion_id: str, rejected_completion_id: str, user_id: str = "",
                   identity: Identity | None = None) -> bool:
        """Record that a user preferred one completion over another; False on a repeat."""
        check_id("chosen_completion_id", chosen_completion_id)
        check_id("rejected_completion_id", rejected_completion_id)
        check_length("user_id", user_id, MAX_ID_CHARS)
        rater = self.guard.check(identity, user_id, {"chosen_completion_id": chosen_completion_id,
                                                     "rejected_completion_id": rejected_completion_id})
        new = self.store.add_preference(chosen_completion_id, rejected_completion_id, user_id, rater)
        if new:
            metrics.PREFERENCES.inc()
        return new

    def ranking(self, completion_ids: list[str], user_id: str = "", identity: Identity | None = None) -> bool:
        """Record a user's ranking of completions of one prompt, best first; False on a repeat."""
        max_n = self.engine.config.limits.max_n
        if not 2 <= len(completion_ids) <= max_n:
            raise InvalidArgument("completion_ids", f"rank 2..{max_n} completions (max_n), got {len(completion_ids)}")
        for i, cid in enumerate(completion_ids):
            check_id(f"completion_ids[{i}]", cid)
        check_length("user_id", user_id, MAX_ID_CHARS)
        rater = self.guard.check(identity, user_id, {f"completion_ids[{i}]": c for i, c in enumerate(completion_ids)})
        new = self.store.add_ranking(completion_ids, user_id, rater)
        if new:
            metrics.RANKINGS.labels(str(len(completion_ids))).inc()
        return new


def check_id(name: str, value: str) -> None:
    """A required id: non-empty and bounded."""
    if not value:
        raise InvalidArgument(name, "must not be empty")
    check_length(name, value, MAX_ID_CHARS)


def check_length(name: str, value: str, limit: int) -> None:
    """A string field of at most `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(name, f"at most {limit} characters, got {len(value)}")
