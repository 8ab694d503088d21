"""The TGI-compatible HTTP API (what `text_generation.Client` speaks), served by aiohttp beside gRPC.

Routes: POST / and /generate, POST /generate_stream (server-sent events), GET /info, GET /health,
POST /feedback, /preference and /ranking. Each completion is logged like a gRPC one and its id returned in
the `X-Completion-Id` header. Inputs that already carry the model's chat markup go to the model as
they are; plain text is sent as one user turn of the chat template, as on the gRPC API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rlhf_online import __version__, errors, metrics
from rlhf_online.auth.keys import METADATA_KEY, Identity
from rlhf_online.config import GenerationSettings
from rlhf_online.engine.request import CandidateResult, SamplingParams
from rlhf_online.frontend import Frontend, Job, Update

log = logging.getLogger("rlhf_online.http")

FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
# The one place where library errors become HTTP statuses and TGI error types.
HTTP_ERROR: dict[type[errors.RlhfError], tuple[int, str]] = {
    errors.InvalidArgument: (422, "validation"),
    errors.NotFound: (404, "not_found"),
    errors.Unauthenticated: (401, "unauthenticated"),
    errors.PermissionDenied: (403, "forbidden"),
    errors.ResourceExhausted: (429, "overloaded"),
    errors.Unavailable: (503, "unavailable"),
    errors.DeadlineExceeded: (408, "generation"),
}
# TGI parameters we do not implement: refused by name unless left at their neutral value.
UNSUPPORTED = {"best_of": (None, 1), "repetition_penalty": (None, 1.0), "frequency_penalty": (None, 0.0),
               "typical_p": (None, 1.0), "watermark": (None, False), "grammar": (None,), "top_n_tokens": (None, 0),
               "truncate": (None,)}


def error_response(e: errors.RlhfError) -> web.Response:
    """A TGI-shaped error body with the matching status (and only what a client may be told)."""
    status, kind = next((v for cls, v in HTTP_ERROR.items() if isinstance(e, cls)), (500, "generation"))
    if status == 500:
        log.exception("http request failed", exc_info=e)
    return web.json_response({"error": e.public_message(), "error_type": kind}, status=status)


class HttpApi:
    """Route handlers over the shared frontend."""

    def __init__(self, settings: GenerationSettings, frontend: Frontend) -> None:
        self.settings, self.frontend = settings, frontend
        self.draining = False
        self.in_flight = 0  # requests being handled (changed on the event loop only): draining waits for them

    # ------------------------------------------------------------ generation

    async def root(self, request: web.Request) -> web.StreamResponse:
        """POST /: TGI answers a list, or a stream when the body says `stream: true`."""
        body, caller = await _json(request), await self._caller(request)
        if body.get("stream"):
            return await self._stream(request, body, caller)
        return await self._generate(body, caller, as_list=True)

    async def generate(self, request: web.Request) -> web.Response:
        """POST /generate: one generated text with details."""
        return await self._generate(await _json(request), await self._caller(request), as_list=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """POST /generate_stream: server-sent events, one per token; the last carries the whole text."""
        return await self._stream(request, await _json(request), await self._caller(request))

    async def _caller(self, request: web.Request) -> Identity | None:
        """The identity of the request's `x-api-key` header when keys are required (looked up off the loop)."""
        if self.frontend.authenticator is None:
            return None
        return await asyncio.to_thread(self.frontend.identify, request.headers.get(METADATA_KEY, ""))

    async def _generate(self, body: dict, caller: Identity | None, as_list: bool) -> web.Response:
        job, options = self._submit(body, caller)
        [result] = await self.frontend.generate_async(job)
        out = {"generated_text": self._text(body, result.text, options)}
        if options["details"]:
            out["details"] = {**self._details(result, job), "prefill": [], "tokens": self._tokens(result.token_ids),
                              "top_tokens": None, "best_of_sequences": None}
        return web.json_response([out] if as_list else out, headers=_headers(job, result))

    async def _stream(self, request: web.Request, body: dict, caller: Identity | None) -> web.StreamResponse:
        job, options = self._submit(body, caller)
        with job:  # a client that went away (a failed write) cancels its generation
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **_headers(job)})
            await resp.prepare(request)
            sent = 0
            try:
                async for update in self.frontend.stream_async(job):
                    for data in self._stream_events(update, job, body, options, first_index=sent + 1):
                        await resp.write(f"data:{json.dumps(data)}\n\n".encode())
                    sent += len(update.token_ids)
            except errors.RlhfError as e:
                await resp.write(f"data:{json.dumps({'error': e.public_message(), 'error_type': 'generation'})}\n\n"
                                 .encode())
        await resp.write_eof()
        return resp

    def _stream_events(self, update: Update, job: Job, body: dict, options: dict, first_index: int) -> list[dict]:
        """One SSE payload per token of an update; the update's text rides on its last text token."""
        ids = list(update.token_ids)
        special = [i in self.frontend.eos_ids for i in ids]
        text_at = max((k for k, s in enumerate(special) if not s), default=-1)
        out = []
        for k, tid in enumerate(ids):
            text = self.frontend.token_text(tid) if special[k] else (update.delta if k == text_at else "")
            out.append({"index": first_index + k, "token": {"id": tid, "text": text, "logprob": None,
                                                              "special": special[k]},
                        "generated_text": None, "details": None, "top_tokens": None})
        if update.result is not None and out:
            out[-1]["generated_text"] = self._text(body, update.result.text, options)
            out[-1]["details"] = self._details(update.result, job)
        return out

    def _submit(self, body: dict, caller: Identity | None) -> tuple[Job, dict]:
        """Validate a TGI request and queue it; its events are handed onto this event loop."""
        if self.draining:
            raise errors.Unavailable("server is shutting down")
        inputs = body.get("inputs")
        if not isinstance(inputs, str) or not inputs.strip():
            raise errors.InvalidArgument("inputs", "must be a non-empty string")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise errors.InvalidArgument("parameters", "must be an object")
        params, options = self._params(parameters)
        job = self.frontend.submit(prompt=inputs, raw=self.frontend.has_special_tokens(inputs), params=params, n=1,
                                   prompt_field="inputs", user_id=str(parameters.get("user_id") or ""),
                                   loop=asyncio.get_running_loop(), identity=caller)
        return job, options

    def _params(self, p: dict) -> tuple[SamplingParams, dict]:
        """TGI parameters to sampling params; sampling is on when asked for or implied by a sampling knob."""
        for name, neutral in UNSUPPORTED.items():
            if p.get(name) not in neutral:
                raise errors.InvalidArgument(f"parameters.{name}", "is not supported by this server")
        temperature, top_p, top_k = p.get("temperature"), p.get("top_p"), p.get("top_k")
        if temperature is not None and not (_number(temperature) and temperature > 0):
            raise errors.InvalidArgument("parameters.temperature", "must be strictly positive")
        if top_p is not None and not (_number(top_p) and 0 < top_p < 1):
            raise errors.InvalidArgument("parameters.top_p", "must be > 0.0 and < 1.0")
        if top_k is not None and not (isinstance(top_k, int) and top_k > 0):
            raise errors.InvalidArgument("parameters.top_k", "must be strictly positive")
        max_new = p.get("max_new_tokens")
        if max_new is not None and not isinstance(max_new, int):
            raise errors.InvalidArgument("parameters.max_new_tokens", "must be an integer")
        seed = p.get("seed")
        if seed is not None and not (isinstance(seed, int) and seed >= 0):
            raise errors.InvalidArgument("parameters.seed", "must be a non-negative integer")
        stop = p.get("stop") or []
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise errors.InvalidArgument("parameters.stop", "must be a list of strings")
        sample = bool(p.get("do_sample")) or (temperature not in (None, 1.0)) or top_p is not None or top_k is not None
        params = SamplingParams(
            max_new_tokens=self.settings.default_max_new_tokens if max_new is None else max_new,
            temperature=(temperature or 1.0) if sample else 0.0, top_p=top_p or 1.0, top_k=top_k or 0,
            seed=seed, stop=tuple(stop))
        return params, {"details": bool(p.get("details")), "return_full_text": bool(p.get("return_full_text"))}

    def _details(self, result: CandidateResult, job: Job) -> dict:
        return {"finish_reason": FINISH[result.finish_reason], "generated_tokens": result.completion_tokens,
                "seed": job.params.seed}

    def _tokens(self, ids: tuple[int, ...]) -> list[dict]:
        eos = self.frontend.eos_ids
        return [{"id": i, "text": self.frontend.token_text(i), "logprob": None, "special": i in eos} for i in ids]

    @staticmethod
    def _text(body: dict, text: str, options: dict) -> str:
        return body["inputs"] + text if options["return_full_text"] else text

    # ------------------------------------------------------------ feedback and info

    async def feedback(self, request: web.Request) -> web.Response:
        """POST /feedback {completion_id, rating: thumbs_up|thumbs_down, user_id, comment}."""
        body, caller = await _json(request), await self._caller(request)
        new = await asyncio.to_thread(self.frontend.feedback, _str(body, "completion_id"), _str(body, "rating"),
                                      _str(body, "user_id"), _str(body, "comment"), caller)
        return web.json_response({"duplicate": not new})

    async def preference(self, request: web.Request) -> web.Response:
        """POST /preference {chosen_completion_id, rejected_completion_id, user_id}."""
        body, caller = await _json(request), await self._caller(request)
        new = await asyncio.to_thread(self.frontend.preference, _str(body, "chosen_completion_id"),
                                      _str(body, "rejected_completion_id"), _str(body, "user_id"), caller)
        return web.json_response({"duplicate": not new})

    async def ranking(self, request: web.Request) -> web.Response:
        """POST /ranking {completion_ids: [best, ..., worst], user_id}."""
        body, caller = await _json(request), await self._caller(request)
        ids = body.get("completion_ids")
        if not (isinstance(ids, list) and all(isinstance(c, str) for c in ids)):
            raise errors.InvalidArgument("completion_ids", "must be a list of completion id strings, best first")
        new = await asyncio.to_thread(self.frontend.ranking, ids, _str(body, "user_id"), caller)
        return web.json_response({"duplicate": not new})

    async def info(self, request: web.Request) -> web.Response:
        """GET /info: the model and the server's limits, in TGI's field names."""
        info = self.frontend.info()
        limits = info.limits
        return web.json_response({
            "model_id": self.settings.base_model, "model_sha": None,
            "model_dtype": info.dtype, "model_device_type": info.device_type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": info.max_queue + info.max_batch_size,
            "max_best_of": 1, "max_stop_sequences": limits.max_stop_strings,
            "max_input_tokens": limits.max_prompt_tokens, "max_input_length": limits.max_prompt_tokens,
            "max_total_tokens": limits.max_prompt_tokens + limits.max_new_tokens,
            "max_batch_size": info.max_batch_size, "version": __version__, "sha": None,
            "docker_label": None, "policy_version": info.policy_version})

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: 200 while serving, 503 while draining."""
        return web.json_response({}, status=503 if self.draining else 200)


@web.middleware
async def observe(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Map domain errors to TGI errors and record every request's status and latency."""
    start = time.perf_counter()
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        resp = web.json_response({"error": e.reason, "error_type": "validation"}, status=e.status)
    except errors.RlhfError as e:
        resp = error_response(e)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    metrics.HTTP_REQUESTS.labels(route, str(resp.status)).inc()
    metrics.HTTP_LATENCY.labels(route, str(resp.status)).observe(time.perf_counter() - start)
    return resp


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise errors.InvalidArgument("body", "must be JSON") from None
    if not isinstance(body, dict):
        raise errors.InvalidArgument("body", "must be a JSON object")
    return body


def _str(body: dict, name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise errors.InvalidArgument(name, "must be a string")
    return value


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _headers(job: Job, result: CandidateResult | None = None) -> dict[str, str]:
    headers = {"X-Completion-Id": job.completion_ids[0], "X-Policy-Version": job.version,
               "X-Prompt-Tokens": str(job.prompt_tokens)}
    if result is not None:
        headers["X-Generated-Tokens"] = str(result.completion_tokens)
    return headers


class HttpServer:
    """aiohttp on its own event loop thread; the engine keeps the main thread."""

    def __init__(self, api: HttpApi, runner: web.AppRunner, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.api, self.runner, self.loop, self.port = api, runner, loop, port

    def drain(self) -> None:
        """/health says 503 and new generations are refused; running ones finish."""
        self.api.draining = True

    def stop(self) -> None:
        """Close the listener and connections, then the loop."""
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def build_app(api: HttpApi) -> web.Application:
    """The aiohttp application with every route."""
    @web.middleware
    async def count_in_flight(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
        api.in_flight += 1
        try:
            return await handler(request)
        finally:
            api.in_flight -= 1

    app = web.Application(middlewares=[count_in_flight, observe], client_max_size=4 * 1024 * 1024)
    app.add_routes([web.post("/", api.root), web.post("/generate", api.generate),
                    web.post("/generate_stream", api.generate_stream), web.get("/info", api.info),
                    web.get("/health", api.health), web.post("/feedback", api.feedback),
                    web.post("/preference", api.preference), web.post("/ranking", api.ranking)])
    return app


def start_http(settings: GenerationSettings, frontend: Frontend) -> HttpServer:
    """Start the HTTP API on settings.http_port (0 picks a free port)."""
    api = HttpApi(settings, frontend)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="http", daemon=True).start()

    async def setup() -> tuple[web.AppRunner, int]:
        # Stopping comes after the drain waited for running requests (in_flight) up to the grace period: what
        # still runs then is past it, so handlers get 2 s, not aiohttp's default 60, before being cancelled.
        runner = web.AppRunner(build_app(api), handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.http_port)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # the bound port when 0 was asked for

    runner, port = asyncio.run_coroutine_threadsafe(setup(), loop).result(30)
    log.info("http api serving", extra={"port": port})
    return HttpServer(api, runner, loop, port)
