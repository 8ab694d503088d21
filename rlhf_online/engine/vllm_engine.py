"""The serving engine on vLLM (`--engine vllm`): its async engine in this process, our versions as LoRA requests.

vLLM does the batching (paged attention, prefix caching, CUDA graphs, tensor parallelism); this
module keeps what the embedded engine promises the API layers: every candidate pinned to the
policy version it was admitted on, versions loaded before any request uses them and dropped once
idle, the same events, finish reasons, errors and metrics.

Threads: vLLM's `AsyncLLM` lives on an asyncio loop in one thread ("vllm"); callers on any thread
submit through `run_coroutine_threadsafe`. A candidate is one vLLM request with n=1, seeded with
seed + its index as in the embedded engine, so candidates of one request may run on different
versions (a canary mixes them). A LoRA request's name and integer id come from one counter and are
never reused: a reused name would serve prefix-cache entries of the adapter it once named.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_online import metrics
from rlhf_online.adapters.validate import AdapterRejected
from rlhf_online.engine.interface import GENERATION_FAILED, EngineConfig, ServingEngine, eos_ids_of
from rlhf_online.engine.request import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TextEvent,
    finish_request,
    validate_params,
)
from rlhf_online.errors import DeadlineExceeded, ResourceExhausted, RlhfError, Unavailable

log = logging.getLogger("rlhf_online.engine.vllm")

WATCH_SECONDS = 0.02  # how often cancelled and expired requests are looked for (and aborted in vLLM)


@dataclass(frozen=True)
class VllmOptions:
    """What vLLM needs beyond the engine config; every field a `GenerationSettings` setting."""

    dtype: str = "auto"  # "auto" (on a CPU: bf16 where native, else fp32), "float32", "bfloat16"
    max_loras: int = 2  # adapters in one batch: the stable version and a canary (>= 2)
    # the largest LoRA rank accepted: vLLM pads every adapter to it, so it sets the LoRA cost (on this
    # 2-core CPU, 32 rows: 62 tokens/s at 16, 15 at 64); 16 is the trainer's default lora_r
    max_lora_rank: int = 16
    tensor_parallel_size: int = 1  # GPUs one replica spans
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM may take (GPU only)
    start_timeout_seconds: float = 600.0  # engine start-up (model load, compile, KV-cache profiling)


def sampling_params_for(params: SamplingParams, index: int, eos_ids: set[int], room: int) -> Any:
    """vLLM's params for candidate `index` of a request: the same decoding, seeded as the embedded engine seeds it.

    `room` is how many tokens fit the context after the prompt; like the embedded engine, a
    candidate that reaches the end of the context finishes with "length".
    """
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    return VllmParams(
        n=1, max_tokens=max(1, min(params.max_new_tokens, room)),
        temperature=params.temperature,  # 0 is greedy in both
        top_p=params.top_p, top_k=params.top_k,  # 0 = no top-k in both
        seed=None if params.seed is None else params.seed + index,
        stop=list(params.stop) or None, include_stop_str_in_output=False,  # text cut before the stop string
        stop_token_ids=sorted(eos_ids), skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA)


def finish_reason_of(output: Any) -> str | None:
    """Our finish reason for a vLLM CompletionOutput: a stop string is "stop", an EOS token "eos"."""
    reason = output.finish_reason
    if reason is None or reason == "abort":
        return None
    if reason == "length":
        return FINISH_LENGTH
    return FINISH_STOP if isinstance(output.stop_reason, str) else FINISH_EOS


def adapter_rank(path: Path) -> int:
    """The LoRA rank in an adapter's config (the largest, when ranks differ per module)."""
    config = json.loads((path / "adapter_config.json").read_text())
    return max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


class _Live:
    """A submitted request while vLLM works on it."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.ids = [f"{request.request_id}-{k}" for k in range(request.n)]  # vLLM request ids, one per candidate
        self.aborted = False
        self.started = False  # some candidate produced a token


class VllmEngine(ServingEngine):
    """vLLM's AsyncLLM behind the ServingEngine interface."""

    def __init__(self, model_path: Path, tokenizer: Any, config: EngineConfig | None = None,
                 options: VllmOptions | None = None) -> None:
        from transformers import AutoConfig, GenerationConfig

        super().__init__()
        self.model_path = Path(model_path)
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.options = options or VllmOptions()
        self.dtype = self._resolve_dtype(self.options.dtype)
        if self.options.max_loras < 2:
            raise ValueError("max_loras must be >= 2: a stable version and a canary share the batch")
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        self.eos_ids = eos_ids_of(tokenizer, generation_config)
        self._model_config = AutoConfig.from_pretrained(self.model_path)
        self.max_context = int(getattr(self._model_config, "max_position_embeddings", 2048))
        self._module_tree: Any = None

        self._live: dict[int, _Live] = {}
        self._lora_ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._llm: Any = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> VllmEngine:
        """Start vLLM on its own thread and wait until it takes requests (tens of seconds: load, compile, profile)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve_loop, name="vllm", daemon=True)
            self._thread.start()
        if not self._ready.wait(self.options.start_timeout_seconds):
            raise Unavailable(f"vLLM did not start in {self.options.start_timeout_seconds:.0f} s")
        if self._start_error is not None:
            raise RuntimeError(f"vLLM failed to start: {self._start_error}") from self._start_error
        return self

    def run(self) -> None:
        """Serve until stop(); the engine runs on its own thread, so this only waits."""
        self.start()
        self._stopped.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what runs, fail what waits with UNAVAILABLE, shut vLLM down."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._thread is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            self._thread.join(timeout)
        self._stopped.set()

    # ---------------------------------------------------------------- what it serves

    @property
    def busy(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._live)

    @staticmethod
    def _resolve_dtype(setting: str) -> str:
        """`auto` on a CPU means what it means for the embedded engine: bf16 where it runs natively, else fp32.

        vLLM's own `auto` takes the checkpoint's bf16 on every x86 CPU, where without AMX / AVX512-BF16
        each bf16 matmul is emulated and slower than fp32. On a GPU vLLM's choice stands.
        """
        from vllm.platforms import current_platform

        if setting != "auto" or current_platform.device_type != "cpu":
            return setting
        from rlhf_online.models.provision import pick_dtype

        return str(pick_dtype(setting, "cpu")).removeprefix("torch.")

    @property
    def dtype_name(self) -> str:
        """The dtype vLLM runs the weights in."""
        if self._llm is not None:
            return str(self._llm.model_config.dtype).replace("torch.", "")
        return self.dtype

    @property
    def device_type(self) -> str:
        """vLLM's platform: "cpu" or "cuda"."""
        from vllm.platforms import current_platform

        return str(current_platform.device_type)

    @property
    def module_tree(self) -> Any:
        """The base model built on the meta device: its layer names and shapes, no weights."""
        if self._module_tree is None:
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self._module_tree = AutoModelForCausalLM.from_config(self._model_config)
        return self._module_tree

    # ---------------------------------------------------------------- requests

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               deadline: float | None = None, sink: Callable[[Any], None] | None = None,
               route: Callable[[str, str], Sequence[str]] | None = None) -> RequestHandle:
        """Queue a request with vLLM; RESOURCE_EXHAUSTED past max_batch_size + max_queue requests, UNAVAILABLE draining."""
        validate_params(params, n, self.config.limits)
        req = GenerationRequest(prompt_ids=list(prompt_ids), params=params, n=n, deadline=deadline, sink=sink)
        with self._lock:
            if self._draining or self._stopping:
                raise Unavailable("server is shutting down; retry on another replica")
            if self._llm is None:
                raise Unavailable("the vLLM engine is not running yet; retry shortly")
            # vLLM keeps its own queue; ours bounds what one replica accepts, as the embedded engine's does.
            if len(self._live) >= self.config.max_batch_size + self.config.max_queue:
                metrics.REQUESTS_FINISHED.labels("rejected").inc()
                raise ResourceExhausted(f"queue full ({self.config.max_queue} requests waiting); retry later")
            self._route(req, route)
            req.remaining = n
            live = _Live(req)
            self._live[req.request_id] = live
            self._update_gauges()
        asyncio.run_coroutine_threadsafe(self._generate(live), self._loop)
        return RequestHandle(req)

    # ---------------------------------------------------------------- versions

    def load_adapter(self, version: str, path: Path, timeout: float = 120.0) -> None:
        """Register the adapter with vLLM under a never-reused name and id; it loads before any request uses it."""
        rank = adapter_rank(path)
        if rank > self.options.max_lora_rank:
            raise AdapterRejected(f"{version}: LoRA rank {rank} is above --max-lora-rank {self.options.max_lora_rank}")
        self._call(self._add_lora(version, path), timeout)

    # ---------------------------------------------------------------- helpers (any thread)

    def _assigned(self) -> None:
        """A role changed: remove what became idle (on vLLM's loop)."""
        self._loop.call_soon_threadsafe(self._remove_idle)

    def _call(self, coro: Any, timeout: float) -> Any:
        """Run a coroutine on vLLM's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise Unavailable("vLLM did not finish the command in time") from None

    def _update_gauges(self) -> None:
        """Queue depth (requests with no token yet) and running rows (candidates of the others); the lock held."""
        metrics.QUEUE_DEPTH.set(sum(1 for live in self._live.values() if not live.started))
        metrics.RUNNING_ROWS.set(sum(live.request.n for live in self._live.values() if live.started))

    # ---------------------------------------------------------------- the loop thread

    def _serve_loop(self) -> None:
        """The vLLM thread: start AsyncLLM, watch for cancellations, run until shut down."""
        asyncio.set_event_loop(self._loop)
        try:
            self._llm = self._make_llm()
        except BaseException as e:  # reported by start()
            log.exception("vLLM failed to start")
            self._start_error = e
            self._ready.set()
            self._stopped.set()
            return
        self._ready.set()
        log.info("vLLM engine ready", extra={"model": str(self.model_path), "dtype": self.dtype_name,
                                             "max_loras": self.options.max_loras,
                                             "tensor_parallel_size": self.options.tensor_parallel_size})
        self._loop.create_task(self._watch())
        try:
            self._loop.run_forever()
        finally:
            self._stopped.set()

    def _make_llm(self) -> Any:
        """AsyncLLM for the base model with LoRA enabled."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        o = self.options
        args = AsyncEngineArgs(
            model=str(self.model_path), tokenizer=str(self.model_path), dtype=self.dtype,
            max_model_len=self.max_context, max_num_seqs=self.config.max_batch_size,
            # the embedded engine's bound on KV-cache positions, as bytes; unset, vLLM on a CPU takes
            # gpu_memory_utilization of the machine's memory (this 24 GiB machine ran out at rank 64)
            kv_cache_memory_bytes=self.kv_cache_bytes(),
            enable_lora=True, max_loras=o.max_loras, max_lora_rank=o.max_lora_rank,
            max_cpu_loras=2 * o.max_loras,  # room for versions being replaced while their requests finish
            tensor_parallel_size=o.tensor_parallel_size, gpu_memory_utilization=o.gpu_memory_utilization,
            enable_log_requests=False, disable_log_stats=True)
        return AsyncLLM.from_engine_args(args)

    def kv_cache_bytes(self) -> int:
        """vLLM's KV cache for `max_batch_tokens` positions: K and V of every layer's KV heads, 2 bytes (4 in float32)."""
        c = self._model_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        element = 4 if self.dtype == "float32" else 2
        return self.config.max_batch_tokens * 2 * c.num_hidden_layers * kv_heads * head_dim * element

    async def _watch(self) -> None:
        """Abort the vLLM requests of cancelled and expired requests (nothing else looks at them)."""
        while True:
            now = time.monotonic()
            with self._lock:
                ended = [live for live in self._live.values()
                         if not live.aborted and (live.request.cancelled.is_set() or live.request.expired(now))]
                for live in ended:
                    live.aborted = True
            for live in ended:
                await self._llm.abort(live.ids)
            await asyncio.sleep(WATCH_SECONDS)

    async def _generate(self, live: _Live) -> None:
        """Run every candidate of a request and close it: ok, cancelled, expired or failed."""
        req = live.request
        outcomes = await asyncio.gather(*(self._candidate(live, k) for k in range(req.n)), return_exceptions=True)
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        try:
            if self._stopping:
                return  # _shutdown already failed it
            if errors:
                log.error("generation failed", exc_info=errors[0], extra={"request_id": req.request_id})
                metrics.REQUESTS_FINISHED.labels("failed").inc()
                finish_request(req, RlhfError(GENERATION_FAILED))
            elif req.remaining > 0:  # aborted: cancelled or past its deadline
                self._end_aborted(req)
            else:
                metrics.REQUESTS_FINISHED.labels("ok").inc()
                finish_request(req)
        finally:
            with self._lock:
                self._live.pop(req.request_id, None)
                self._update_gauges()
            self._remove_idle()

    async def _candidate(self, live: _Live, index: int) -> None:
        """Stream one candidate from vLLM into the request's events."""
        from vllm.inputs import TokensPrompt

        req = live.request
        version = req.versions[index]
        lora = self._adapters.get(version) if version else None
        if version and lora is None:
            raise RuntimeError(f"version {version} was pinned but is not loaded")
        params = sampling_params_for(req.params, index, self.eos_ids, self.max_context - len(req.prompt_ids))
        tokens = 0
        try:
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=req.prompt_ids), params,
                                                live.ids[index], lora_request=lora):
                tokens += len(out.outputs[0].token_ids)
                if self._take(live, index, out.outputs[0], tokens):
                    return
        except Exception:
            with contextlib.suppress(Exception):  # a failed candidate does not keep generating
                await self._llm.abort(live.ids[index])
            raise

    def _take(self, live: _Live, index: int, c: Any, tokens: int) -> bool:
        """Hand one vLLM output of candidate `index` (`tokens` so far, its own included) to the request; True once done."""
        req = live.request
        if c.token_ids and not live.started:
            now = time.monotonic()
            with self._lock:
                live.started = True
                self._update_gauges()
            if req.first_token_at is None:
                req.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.observe(now - req.submitted_at)
                metrics.PROMPT_TOKENS.inc(len(req.prompt_ids))
        metrics.TOKENS_GENERATED.inc(len(c.token_ids))
        if live.aborted:
            return True
        if c.finish_reason == "abort":  # not by us: vLLM gave up on it
            raise RuntimeError(f"vLLM aborted candidate {index} of request {req.request_id}")
        finish = finish_reason_of(c)
        if c.text or c.token_ids or finish:
            req.emit(TextEvent(index, c.text, finish, tokens if finish else 0, tuple(c.token_ids)))
        if finish:
            req.remaining -= 1
        return finish is not None

    def _end_aborted(self, req: GenerationRequest) -> None:
        """Close an aborted request: nothing more for a cancelled one, DEADLINE_EXCEEDED for an expired one."""
        if req.cancelled.is_set():
            metrics.REQUESTS_FINISHED.labels("cancelled").inc()
            finish_request(req)
        else:
            metrics.REQUESTS_FINISHED.labels("deadline_exceeded").inc()
            finish_request(req, DeadlineExceeded("deadline passed during generation; generation stopped"))
        req.cancelled.set()

    async def _add_lora(self, version: str, path: Path) -> None:
        """Load `version` into vLLM under a fresh name and id (a retired one coming back gets new ones too)."""
        from vllm.lora.request import LoRARequest

        with self._lock:
            if version in self._adapters:
                return
        lora_id = next(self._lora_ids)
        lora = LoRARequest(lora_name=f"{version}-{lora_id}", lora_int_id=lora_id, lora_path=str(path))
        if not await self._llm.add_lora(lora):
            raise AdapterRejected(f"{version}: vLLM refused the adapter")
        with self._lock:
            self._adapters[version] = lora
            metrics.ADAPTERS_LOADED.set(len(self._adapters))

    def _remove_idle(self) -> None:
        """Remove retired versions no live request runs on from vLLM (on its loop)."""
        with self._lock:
            pinned = {v for live in self._live.values() for v in live.request.versions}
            idle = [v for v in self._retired if v not in pinned]
            loras = [self._adapters.pop(v) for v in idle if v in self._adapters]
            self._retired -= set(idle)
            metrics.ADAPTERS_LOADED.set(len(self._adapters))
        for lora in loras:
            self._loop.create_task(self._llm.remove_lora(lora.lora_int_id))
            log.info("adapter unloaded", extra={"lora": lora.lora_name})

    async def _shutdown(self) -> None:
        """Fail every live request with UNAVAILABLE, stop vLLM, end the loop."""
        with self._lock:
            lives = list(self._live.values())
            for live in lives:
                live.aborted = True
        for live in lives:
            await self._llm.abort(live.ids)
            metrics.REQUESTS_FINISHED.labels("failed").inc()
            finish_request(live.request, Unavailable("server is shutting down; retry on another replica"))
        self._llm.shutdown()
        with self._lock:
            self._live.clear()
            self._update_gauges()
        self._loop.stop()
