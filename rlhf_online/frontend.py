"""What every API front-end (gRPC, TGI-compatible HTTP) does around the engine: validate, submit, log, feedback."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_online import metrics
from rlhf_online.engine.engine import Engine
from rlhf_online.engine.request import CandidateResult, RequestHandle, SamplingParams
from rlhf_online.errors import InvalidArgument
from rlhf_online.store import CompletionRecord, Store

MAX_ID_CHARS, MAX_COMMENT_CHARS, MAX_METADATA_ITEMS, MAX_METADATA_CHARS = 128, 4096, 32, 1024


@dataclass
class Job:
    """A submitted generation: its completion ids, its engine handle, and what to log when it finishes."""

    prompt: str
    messages: tuple[tuple[str, str], ...]
    params: SamplingParams
    prompt_tokens: int
    completion_ids: list[str]
    handle: RequestHandle
    user_id: str
    metadata: dict[str, str]

    @property
    def version(self) -> str:
        """The policy version serving this job."""
        return self.handle.version


class Frontend:
    """The engine plus the completion log, with the request checks both APIs share."""

    def __init__(self, engine: Engine, store: Store) -> None:
        self.engine, self.store = engine, store

    def submit(self, *, prompt: str = "", messages: tuple[tuple[str, str], ...] = (), raw: bool = False,
               params: SamplingParams, n: int = 1, user_id: str = "", metadata: dict[str, str] | None = None,
               deadline: float | None = None, sink: Callable[[Any], None] | None = None,
               prompt_field: str = "prompt") -> Job:
        """Validate and queue a request; `raw` sends the prompt without the chat template.

        `prompt_field` is the name the caller's API gives the prompt, used in error messages.
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
        handle = self.engine.submit(prompt_ids, params, n=n, deadline=deadline, sink=sink)
        ids = [f"cmpl-{uuid.uuid4().hex}" for _ in range(n)]
        return Job(prompt, tuple(messages), params, len(prompt_ids), ids, handle, user_id, metadata)

    def log(self, job: Job, results: list[CandidateResult]) -> None:
        """Write every candidate to the store with the version that produced it."""
        p = job.params
        params = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                  "top_k": p.top_k, "seed": p.seed, "stop": list(p.stop), "n": len(results)}
        now = time.time()
        self.store.add_completions([
            CompletionRecord(completion_id=cid, prompt=job.prompt, messages=job.messages, text=r.text,
                             policy_version=job.version, user_id=job.user_id, params=params,
                             prompt_tokens=job.prompt_tokens, completion_tokens=r.completion_tokens,
                             finish_reason=r.finish_reason, metadata=job.metadata, created_at=now)
            for cid, r in zip(job.completion_ids, results, strict=True)])
        metrics.COMPLETIONS_LOGGED.inc(len(results))

    def feedback(self, completion_id: str, rating: str, user_id: str = "", comment: str = "") -> bool:
        """Record a rating; False (and counted once) when this user already rated this completion.

        The store checks the rating before anything is written.
        """
        check_id("completion_id", completion_id)
        check_length("user_id", user_id, MAX_ID_CHARS)
        check_length("comment", comment, MAX_COMMENT_CHARS)
        new = self.store.add_feedback(completion_id, user_id, rating, comment)
        if new:
            metrics.FEEDBACK.labels(rating).inc()
        else:
            metrics.FEEDBACK_DUPLICATES.inc()
        return new

    def preference(self, chosen_completion_id: str, rejected_completion_id: str, user_id: str = "") -> bool:
        """Record that a user preferred one completion over another; False on a repeat."""
        check_id("chosen_completion_id", chosen_completion_id)
        check_id("rejected_completion_id", rejected_completion_id)
        check_length("user_id", user_id, MAX_ID_CHARS)
        new = self.store.add_preference(chosen_completion_id, rejected_completion_id, user_id)
        if new:
            metrics.PREFERENCES.inc()
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
