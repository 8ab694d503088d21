"""The Generation gRPC service: protobuf in, engine and store calls, protobuf out."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from rlhf_online import metrics
from rlhf_online.config import GenerationSettings
from rlhf_online.engine.engine import Engine
from rlhf_online.engine.request import CandidateResult, RequestHandle, SamplingParams
from rlhf_online.errors import InvalidArgument
from rlhf_online.store import CompletionRecord, Store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.server import RunningServer, start_server

log = logging.getLogger("rlhf_online.generation")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP}
RATING = {pb.RATING_THUMBS_UP: "thumbs_up", pb.RATING_THUMBS_DOWN: "thumbs_down"}
MAX_ID_CHARS, MAX_COMMENT_CHARS, MAX_METADATA_ITEMS, MAX_METADATA_CHARS = 128, 4096, 32, 1024


@dataclass
class _Job:
    """A submitted Generate call: its ids, its engine handle and what to log when it finishes."""

    request: pb.GenerateRequest
    params: SamplingParams
    prompt_tokens: int
    completion_ids: list[str]
    handle: RequestHandle


class GenerationServicer(pb_grpc.GenerationServicer):
    """Generate and GenerateStream through the engine; feedback and preferences into the store."""

    def __init__(self, engine: Engine, store: Store, settings: GenerationSettings) -> None:
        self.engine, self.store, self.settings = engine, store, settings

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        """All candidates at once, after the last one finishes."""
        job = self._submit(request, context)
        results = job.handle.result()
        self._log(job, results)
        return pb.GenerateResponse(
            completions=[pb.Completion(completion_id=cid, text=r.text, finish_reason=FINISH[r.finish_reason],
                                       completion_tokens=r.completion_tokens)
                         for cid, r in zip(job.completion_ids, results, strict=True)],
            policy_version=job.handle.version, prompt_tokens=job.prompt_tokens)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        """Text deltas as tokens arrive; each candidate's last message is held until all are logged."""
        job = self._submit(request, context)
        version = job.handle.version
        texts: dict[int, list[str]] = {}
        finals: dict[int, CandidateResult] = {}
        last_delta: dict[int, str] = {}
        for ev in job.handle.events():
            texts.setdefault(ev.index, []).append(ev.delta)
            if ev.finish_reason is None:
                yield pb.GenerateStreamResponse(completion_id=job.completion_ids[ev.index], text_delta=ev.delta,
                                                policy_version=version)
                continue
            # The final delta waits until every candidate is logged, so feedback sent right after
            # the stream ends always finds its completion.
            finals[ev.index] = CandidateResult("".join(texts[ev.index]), ev.finish_reason, ev.completion_tokens)
            last_delta[ev.index] = ev.delta
        results = [finals[i] for i in range(len(job.completion_ids))]
        self._log(job, results)
        for i, r in enumerate(results):
            yield pb.GenerateStreamResponse(completion_id=job.completion_ids[i], text_delta=last_delta[i],
                                            finish_reason=FINISH[r.finish_reason], policy_version=version,
                                            completion_tokens=r.completion_tokens)

    def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context: grpc.ServicerContext) -> pb.SubmitFeedbackResponse:
        """Record a thumbs-up/down; a repeat of (completion_id, user_id) is OK and counted once."""
        _check_id("completion_id", request.completion_id)
        _check_len("user_id", request.user_id, MAX_ID_CHARS)
        _check_len("comment", request.comment, MAX_COMMENT_CHARS)
        if request.rating not in RATING:
            raise InvalidArgument("rating", "must be RATING_THUMBS_UP or RATING_THUMBS_DOWN")
        rating = RATING[request.rating]
        new = self.store.add_feedback(request.completion_id, request.user_id, rating, request.comment)
        if new:
            metrics.FEEDBACK.labels(rating).inc()
        else:
            metrics.FEEDBACK_DUPLICATES.inc()
        return pb.SubmitFeedbackResponse(duplicate=not new)

    def SubmitPreference(self, request: pb.SubmitPreferenceRequest, context: grpc.ServicerContext) -> pb.SubmitPreferenceResponse:
        """Record that one completion was preferred over another by a user."""
        _check_id("chosen_completion_id", request.chosen_completion_id)
        _check_id("rejected_completion_id", request.rejected_completion_id)
        _check_len("user_id", request.user_id, MAX_ID_CHARS)
        new = self.store.add_preference(request.chosen_completion_id, request.rejected_completion_id, request.user_id)
        if new:
            metrics.PREFERENCES.inc()
        return pb.SubmitPreferenceResponse(duplicate=not new)

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        """The version new requests are served from."""
        return pb.Policy(version=self.engine.policy_version, base_model=self.settings.base_model)

    # ------------------------------------------------------------------ helpers

    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> _Job:
        """Validate, tokenize and queue a request; cancelled with the RPC."""
        has_prompt, has_messages = bool(request.prompt), len(request.messages) > 0
        if has_prompt == has_messages:
            raise InvalidArgument("prompt", "set exactly one of prompt and messages")
        _check_len("user_id", request.user_id, MAX_ID_CHARS)
        if len(request.metadata) > MAX_METADATA_ITEMS:
            raise InvalidArgument("metadata", f"at most {MAX_METADATA_ITEMS} entries")
        if any(len(k) + len(v) > MAX_METADATA_CHARS for k, v in request.metadata.items()):
            raise InvalidArgument("metadata", f"each key plus value at most {MAX_METADATA_CHARS} characters")
        if has_prompt:
            prompt_ids = self.engine.encode_prompt(request.prompt)
        else:
            prompt_ids = self.engine.encode_messages([(m.role, m.content) for m in request.messages])
        params = self._params(request.params)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        handle = self.engine.submit(prompt_ids, params, n=request.n or 1, deadline=deadline)
        # Fires when the RPC ends for any reason; a client that went away frees its batch slots.
        context.add_callback(handle.cancel)
        ids = [f"cmpl-{uuid.uuid4().hex}" for _ in range(request.n or 1)]
        return _Job(request, params, len(prompt_ids), ids, handle)

    def _params(self, p: pb.SamplingParams) -> SamplingParams:
        """Proto params with server defaults for unset (zero) fields."""
        return SamplingParams(
            max_new_tokens=p.max_new_tokens or self.settings.default_max_new_tokens,
            temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop))

    def _log(self, job: _Job, results: list[CandidateResult]) -> None:
        """Write every candidate to the store with the version that produced it."""
        req = job.request
        params = {"max_new_tokens": job.params.max_new_tokens, "temperature": job.params.temperature,
                  "top_p": job.params.top_p, "top_k": job.params.top_k, "seed": job.params.seed,
                  "stop": list(job.params.stop), "n": len(results)}
        now = time.time()
        self.store.add_completions([
            CompletionRecord(completion_id=cid, prompt=req.prompt,
                             messages=tuple((m.role, m.content) for m in req.messages), text=r.text,
                             policy_version=job.handle.version, user_id=req.user_id, params=params,
                             prompt_tokens=job.prompt_tokens, completion_tokens=r.completion_tokens,
                             finish_reason=r.finish_reason, metadata=dict(req.metadata), created_at=now)
            for cid, r in zip(job.completion_ids, results, strict=True)])
        metrics.COMPLETIONS_LOGGED.inc(len(results))


def _check_id(name: str, value: str) -> None:
    if not value:
        raise InvalidArgument(name, "must not be empty")
    _check_len(name, value, MAX_ID_CHARS)


def _check_len(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(name, f"at most {limit} characters, got {len(value)}")


def start_generation_server(settings: GenerationSettings, engine: Engine, store: Store) -> RunningServer:
    """Start the service around a running engine; draining stops the engine taking new requests."""
    servicer = GenerationServicer(engine, store, settings)
    running = start_server(settings, [SERVICE_NAME],
                           lambda s: pb_grpc.add_GenerationServicer_to_server(servicer, s),
                           workers=settings.worker_threads)
    running.on_drain.append(engine.drain)
    running.busy.append(lambda: engine.busy > 0)
    running.on_stopped.extend([engine.stop, store.close])
    return running
