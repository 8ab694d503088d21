"""The Generation gRPC service: protobuf in, frontend calls, protobuf out."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.adapters.watcher import AdapterWatcher
from rlhf_online.auth.guard import FeedbackGuard
from rlhf_online.auth.keys import KeyAuthenticator
from rlhf_online.auth.limits import RateLimiter
from rlhf_online.canary.routing import CanaryRouter
from rlhf_online.config import GenerationSettings
from rlhf_online.engine.interface import ServingEngine
from rlhf_online.engine.request import SamplingParams
from rlhf_online.errors import InvalidArgument
from rlhf_online.frontend import Frontend, Job
from rlhf_online.store import Store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.interceptors import ApiKeyInterceptor, caller
from services.server import RunningServer, start_server

log = logging.getLogger("rlhf_online.generation")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP}
RATING = {pb.RATING_THUMBS_UP: "thumbs_up", pb.RATING_THUMBS_DOWN: "thumbs_down"}
NO_DEADLINE_S = 365 * 24 * 3600.0
# Every call that generates or rates needs a key when keys are required; GetPolicy tells only versions.
KEYED_METHODS = {f"/{SERVICE_NAME}/{m}" for m in ("Generate", "GenerateStream", "SubmitFeedback", "SubmitPreference",
                                                  "SubmitRanking")}
SAMPLED_TEMPERATURE = 1.0  # the temperature of an n > 1 request that left it unset


class GenerationServicer(pb_grpc.GenerationServicer):
    """Generate and GenerateStream through the engine; feedback, preferences and rankings into the store."""

    def __init__(self, frontend: Frontend, settings: GenerationSettings) -> None:
        self.frontend, self.settings = frontend, settings

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        """All candidates at once, after the last one finishes (and is logged)."""
        job = self._submit(request, context)
        results = self.frontend.generate(job)
        return pb.GenerateResponse(
            completions=[pb.Completion(completion_id=cid, text=r.text, finish_reason=FINISH[r.finish_reason],
                                       completion_tokens=r.completion_tokens, policy_version=version)
                         for cid, r, version in zip(job.completion_ids, results, job.versions, strict=True)],
            policy_version=job.version, prompt_tokens=job.prompt_tokens)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        """Text deltas as tokens arrive; each candidate's last message comes once all are logged."""
        job = self._submit(request, context)
        for u in self.frontend.stream(job):
            if u.result is None:
                yield pb.GenerateStreamResponse(completion_id=u.completion_id, text_delta=u.delta,
                                                policy_version=job.versions[u.index])
            else:
                yield pb.GenerateStreamResponse(completion_id=u.completion_id, text_delta=u.delta,
                                                finish_reason=FINISH[u.result.finish_reason],
                                                policy_version=job.versions[u.index],
                                                completion_tokens=u.result.completion_tokens)

    def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context: grpc.ServicerContext) -> pb.SubmitFeedbackResponse:
        """Record a thumbs-up/down; a repeat of (completion_id, user_id) is OK and counted once."""
        if request.rating not in RATING:
            raise InvalidArgument("rating", "must be RATING_THUMBS_UP or RATING_THUMBS_DOWN")
        new = self.frontend.feedback(request.completion_id, RATING[request.rating], request.user_id, request.comment,
                                     identity=caller())
        return pb.SubmitFeedbackResponse(duplicate=not new)

    def SubmitPreference(self, request: pb.SubmitPreferenceRequest, context: grpc.ServicerContext) -> pb.SubmitPreferenceResponse:
        """Record that one completion was preferred over another by a user."""
        new = self.frontend.preference(request.chosen_completion_id, request.rejected_completion_id, request.user_id,
                                       identity=caller())
        return pb.SubmitPreferenceResponse(duplicate=not new)

    def SubmitRanking(self, request: pb.SubmitRankingRequest, context: grpc.ServicerContext) -> pb.SubmitRankingResponse:
        """Record a user's ranking of completions of one prompt, best first."""
        new = self.frontend.ranking(list(request.completion_ids), request.user_id, identity=caller())
        return pb.SubmitRankingResponse(duplicate=not new)

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        """The versions new requests are served from: the stable one, and the canary with its share of users."""
        canary = self.frontend.canary_version
        return pb.Policy(version=self.frontend.policy_version, base_model=self.settings.base_model,
                         canary_version=canary, canary_percent=self.settings.canary_percent if canary else 0.0)

    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Job:
        """Queue a request with the client's deadline; cancelled when the RPC ends."""
        remaining = context.time_remaining()
        # Without a client deadline grpc reports an enormous remaining time, not None.
        no_deadline = remaining is None or remaining > NO_DEADLINE_S
        job = self.frontend.submit(
            prompt=request.prompt, messages=tuple((m.role, m.content) for m in request.messages),
            params=self._params(request.params, request.n or 1), n=request.n or 1, user_id=request.user_id,
            metadata=dict(request.metadata), identity=caller(),
            deadline=None if no_deadline else time.monotonic() + remaining)
        # Fires when the RPC ends for any reason; a client that went away frees its batch slots.
        context.add_callback(job.cancel)
        return job

    def _params(self, p: pb.SamplingParams, n: int) -> SamplingParams:
        """Proto params with server defaults for unset (zero) fields.

        Temperature 0 is greedy, except with n > 1: there it samples at 1.0 (vLLM's and OpenAI's
        default), since n greedy candidates would all be the same text and a preference or ranking
        between them would say nothing. proto3 cannot tell an unset temperature from 0.
        """
        return SamplingParams(
            max_new_tokens=p.max_new_tokens or self.settings.default_max_new_tokens,
            temperature=p.temperature or (SAMPLED_TEMPERATURE if n > 1 else 0.0), top_p=p.top_p or 1.0, top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop))


def start_generation_server(settings: GenerationSettings, engine: ServingEngine, store: Store) -> RunningServer:
    """Start the service around an engine; draining stops the engine taking new requests."""
    guard = FeedbackGuard(store, RateLimiter(settings.feedback_rate_per_user, settings.feedback_burst_per_user),
                          RateLimiter(settings.feedback_rate_per_key, settings.feedback_burst_per_key))
    authenticator = KeyAuthenticator(store, settings.api_key_cache_seconds) if settings.require_api_key else None
    frontend = Frontend(engine, store, CanaryRouter(settings.canary_percent), guard, authenticator)
    servicer = GenerationServicer(frontend, settings)
    auth = ApiKeyInterceptor(authenticator, KEYED_METHODS) if authenticator else None
    running = start_server(settings, [SERVICE_NAME],
                           lambda s: pb_grpc.add_GenerationServicer_to_server(servicer, s),
                           workers=settings.worker_threads, auth=auth)
    if authenticator is None:
        log.warning("API keys not required: any caller may generate and rate any completion under any user_id "
                    "(fine on loopback; set --require-api-key where others can reach this port)")
    else:
        log.info("API keys required", extra={"methods": sorted(m.rsplit("/", 1)[-1] for m in KEYED_METHODS)})
    running.on_drain.append(engine.drain)
    running.busy.append(lambda: engine.busy > 0)
    if settings.http_port >= 0:
        from services.tgi_http import start_http

        http = start_http(settings, frontend)
        running.http_port = http.port
        running.on_drain.append(http.drain)
        running.busy.append(lambda: http.api.in_flight > 0)  # the grace period covers HTTP requests too
        running.on_stopped.insert(0, http.stop)
    registry = AdapterRegistry(settings.adapter_dir)
    watcher = AdapterWatcher(registry, engine, base_model=settings.base_model,
                             poll_seconds=settings.adapter_poll_seconds, notice_seconds=settings.adapter_notice_seconds)
    watcher.start()  # its first poll loads CURRENT, if the registry has one
    running.on_drain.append(watcher.stop)
    running.on_stopped.extend([engine.stop, store.close])
    return running
