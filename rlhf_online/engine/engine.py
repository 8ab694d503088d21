"""Continuous-batching generation engine: one model, one decode loop, many concurrent requests.

Requests wait in a bounded queue; between decode steps the loop admits as many as fit,
prefills them together, and merges their KV cache into the running batch. Every step decodes
one token for every running row; rows leave the batch as soon as they finish, are cancelled
or pass their deadline, so their slot is free for the next request at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from rlhf_online import metrics
from rlhf_online.engine import attention, lora_mix, lora_slots
from rlhf_online.engine.batch import KVBatch
from rlhf_online.engine.detok import IncrementalText
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
from rlhf_online.engine.sampling import make_generator, sample_rows
from rlhf_online.errors import DeadlineExceeded, ResourceExhausted, RlhfError, Unavailable

log = logging.getLogger("rlhf_online.engine")

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class _Row:
    """One candidate being decoded."""

    request: GenerationRequest
    index: int
    text: IncrementalText
    generator: torch.Generator
    adapter: str
    tokens: int = 0
    finish: str | None = None
    ids: list[int] = field(default_factory=list)  # every sampled token, EOS included
    sent: int = 0  # how many of `ids` earlier events carried


def _reserved(req: GenerationRequest) -> int:
    """Cache positions one row of the request may reach: its prompt and every token it may generate."""
    return len(req.prompt_ids) + req.params.max_new_tokens


class Engine(ServingEngine):
    """Owns the model; a background thread runs the batched decode loop."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.eos_ids = eos_ids_of(tokenizer, getattr(model, "generation_config", None))
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        # With the fp32 decode attention the running batch's cache is kept in fp32 (batch.GrowingLayer): the same
        # bf16 numbers, widened once when written instead of at every step's attention. Such a position takes the
        # bytes of two in the model's dtype, and max_batch_tokens counts it twice, so the cache's memory stays
        # within what the setting gives a bf16 cache.
        self._cache_dtype: torch.dtype | None = None
        self._position_cost = 1
        if attention.use_for_decoding(model):
            self._cache_dtype = torch.float32
            self._position_cost = torch.finfo(torch.float32).bits // torch.finfo(next(model.parameters()).dtype).bits
            log.info("decode attention", extra={"implementation": attention.NAME, "cache_dtype": "float32"})

        super().__init__()
        self._lock = threading.Condition()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._commands: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        # LoRA layer slots: a version's PEFT adapter name is "slot<k>"; a retired version's slot is kept
        # (one at most) so that the next version of the same signature is copied into it.
        self._slot_signatures: dict[str, lora_slots.Signature | None] = {}
        self._free_slot: str | None = None
        self._slots_made = 0
        self._lora_layers: dict[str, Any] | None = None  # PEFT module name -> LoRA layer, None = not yet found
        self._active: list[str] | None = None  # the adapters active in every LoRA layer, None = unknown
        self._enabled: bool | None = None  # whether the LoRA layers add their adapters at all, None = unknown
        self._mix: lora_mix.MixedLora | None = None  # stacked versions of the last multi-version batch, None = stale
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "slot_reuses": 0, "stacked_passes": 0}  # for tests and benchmarks

    # ---------------------------------------------------------------- public API (any thread)

    def start(self) -> Engine:
        """Run the decode loop in a background thread (tests, in-process use)."""
        if self._thread is not None:  # two loops would step the same batch at once
            raise RuntimeError("the engine's decode loop is already running")
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the decode loop in the calling thread until stop() (servers: the main thread, see mainthread.py)."""
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running fail with UNAVAILABLE."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._waiting) + len({id(r.request) for r in self._rows})

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as clients see it: "float32", "bfloat16", ..."""
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda"."""
        return self.device.type

    @property
    def module_tree(self) -> Any:
        """The served model itself (PEFT-wrapped once an adapter is loaded)."""
        return self.model

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               deadline: float | None = None, sink: Callable[[Any], None] | None = None,
               route: Callable[[str, str], Sequence[str]] | None = None) -> RequestHandle:
        """Queue a request; raises RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when draining.

        Every candidate runs on the current version, or, with `route`, on the version
        `route(current, canary)[i]` names: called under the engine's lock, so the versions it picks
        are the ones served at that instant and stay loaded while the request runs. Events go to the
        handle's queue, or to `sink` (called on the engine thread) when given.
        """
        validate_params(params, n, self.config.limits)
        req = GenerationRequest(prompt_ids=prompt_ids, params=params, n=n, deadline=deadline, sink=sink)
        with self._lock:
            if self._draining or self._stopping:
                raise Unavailable("server is shutting down; retry on another replica")
            if len(self._waiting) >= self.config.max_queue:
                metrics.REQUESTS_FINISHED.labels("rejected").inc()
                raise ResourceExhausted(f"queue full ({self.config.max_queue} requests waiting); retry later")
            self._route(req, route)
            self._waiting.append(req)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._lock.notify_all()
        return RequestHandle(req)

    def load_adapter(self, version: str, path: Path, timeout: float = 120.0) -> None:
        """Load a PEFT adapter as `version` beside the ones serving (validated by the caller).

        Its files are read here, on the caller's thread; the engine thread, between steps, only
        copies them into a retired version's layers, or has PEFT build new ones.
        """
        prepared = lora_slots.prepare(Path(path), self.device)
        self._call(lambda: self._load_adapter(version, prepared), timeout)

    # ---------------------------------------------------------------- helpers

    def _assigned(self) -> None:
        """A role changed: wake the loop, which unloads retired versions between steps."""
        self._lock.notify_all()

    def _call(self, fn: Any, timeout: float) -> Any:
        """Run fn on the engine thread between steps (model surgery must not race a forward)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()

        with self._lock:
            self._commands.append(run)
            self._lock.notify_all()
        if not done.wait(timeout):
            raise Unavailable("engine did not run the command in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _load_adapter(self, version: str, adapter: lora_slots.PreparedAdapter) -> None:
        """Attach an adapter as `version`: into the free slot if its signature fits, else a new PEFT slot."""
        from peft import PeftModel

        if version in self._adapters:
            return
        t0 = time.perf_counter()
        self._mix = None  # a slot's weights change (copied into) or the layers do (PEFT)
        slot = self._free_slot
        reused = slot is not None and adapter.signature is not None and self._slot_signatures[slot] == adapter.signature
        if reused:
            lora_slots.copy_into(self._layers(), slot, adapter)
            self._free_slot = None
            self.stats["slot_reuses"] += 1
        else:
            slot, self._slots_made = f"slot{self._slots_made}", self._slots_made + 1
            self._lora_layers = self._active = self._enabled = None  # PEFT adds layers and may change the active adapter
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(adapter.path), adapter_name=slot, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=slot,
                                                           is_trainable=False)
            except BaseException:
                self._discard_partial(slot)
                raise
            self._slot_signatures[slot] = adapter.signature
            self.model.eval()
        with self._lock:
            self._adapters[version] = slot
        metrics.ADAPTERS_LOADED.set(len(self._adapters))
        log.info("adapter loaded", extra={"version": version, "slot": slot, "reused": reused,
                                          "seconds": round(time.perf_counter() - t0, 4)})

    def _discard_partial(self, version: str) -> None:
        """Take a half-loaded adapter out of every layer, so a failed load leaves the served versions intact.

        PEFT adds an adapter layer by layer; one that fails part way (e.g. a malformed config value)
        would otherwise stay behind in some layers and become their active adapter on the next unload.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and version in module._all_available_adapter_names():
                module.delete_adapter(version)
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict):
            peft_config.pop(version, None)

    def _unload_unused(self) -> None:
        """Release retired adapters that no queued or running request uses any more.

        Checked and released under the lock: set_current / set_canary may bring a retired version
        back at any moment, and one released after that would leave its requests on the bare base.
        A released version's layers stay as the free slot (one at most) while other versions are
        loaded; otherwise they are deleted, and with no version left the model is the plain base
        again. Either takes milliseconds, and this runs between steps, on the engine thread.
        """
        with self._lock:
            used = ({self._current, self._canary} | {v for r in self._rows for v in r.request.versions}
                    | {v for q in self._waiting for v in q.versions})
            idle = [v for v in self._retired if v not in used]
            if idle:
                self._mix = None
            for v in idle:
                slot = self._adapters.pop(v)
                self._retired.discard(v)
                if not self._adapters:
                    # PEFT cannot run with zero adapters: take the LoRA layers out, back to the plain base.
                    self.model = self.model.unload()
                    self._slot_signatures.clear()
                    self._free_slot = None
                    self._lora_layers = self._active = self._enabled = None
                elif self._free_slot is None and self._slot_signatures[slot] is not None:
                    self._free_slot = slot  # its layers stay as they are: the caches hold
                else:
                    self.model.delete_adapter(slot)  # PEFT may make another adapter active
                    del self._slot_signatures[slot]
                    self._lora_layers = self._active = self._enabled = None
                log.info("adapter unloaded", extra={"version": v, "slot": slot})
        if idle:
            metrics.ADAPTERS_LOADED.set(len(self._adapters))

    # ---------------------------------------------------------------- the loop (engine thread)

    def _run(self) -> None:
        """Step until stopped; never dies on a bad batch."""
        # Scoped, not torch.set_grad_enabled(False): the loop may run on the caller's (main) thread,
        # which must get its grad mode back afterwards.
        with torch.no_grad():
            self._loop()
        self._fail_all(Unavailable("server is shutting down"))

    def _loop(self) -> None:
        """The decode loop proper."""
        while True:
            with self._lock:
                # Idle with retired adapters means nothing uses them any more: wake to unload them.
                while not (self._stopping or self._waiting or self._rows or self._commands or self._retired):
                    self._lock.wait(timeout=1.0)  # wakes now and then so the main thread can take signals
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for run in commands:
                run()
            try:
                self._step()
            except Exception:  # a failed forward fails its requests, not the server
                log.exception("decode step failed", extra={"rows": len(self._rows)})
                failed = self._fail_all(RlhfError(GENERATION_FAILED))
                metrics.REQUESTS_FINISHED.labels("failed").inc(failed)

    def _step(self) -> None:
        """Evict, admit, decode one token for every row."""
        self._evict()
        self._admit()
        if self._rows:
            self._decode()
        if self._retired:
            self._unload_unused()

    def _evict(self) -> None:
        """Drop rows and queued requests that were cancelled or passed their deadline."""
        now = time.monotonic()
        with self._lock:
            gone = [q for q in self._waiting if q.cancelled.is_set() or q.expired(now)]
            for q in gone:
                self._waiting.remove(q)
        for q in gone:
            self._end(q, now)
        dead = {id(r.request): r.request for r in self._rows if r.request.cancelled.is_set() or r.request.expired(now)}
        if dead:
            for r in self._rows:
                if id(r.request) in dead:
                    r.finish = "aborted"
            for req in dead.values():
                self._end(req, now)
            self._compact()

    def _end(self, req: GenerationRequest, now: float) -> None:
        """Close an aborted request: an error for an expired one, nothing for a cancelled one."""
        if req.cancelled.is_set():
            metrics.REQUESTS_FINISHED.labels("cancelled").inc()
            finish_request(req)
        else:
            metrics.REQUESTS_FINISHED.labels("deadline_exceeded").inc()
            finish_request(req, DeadlineExceeded("deadline passed during generation; generation stopped"))
        req.cancelled.set()

    def _admit(self) -> None:
        """Move queued requests into the batch while slots and the prefill budget allow."""
        take: list[GenerationRequest] = []
        with self._lock:
            free = self.config.max_batch_size - len(self._rows)
            budget = self.config.max_prefill_tokens
            rows, longest = len(self._rows), max((_reserved(r.request) for r in self._rows), default=0)
            while self._waiting and self._waiting[0].n <= free:
                nxt = self._waiting[0]
                cost = len(nxt.prompt_ids) * len(set(nxt.versions))  # an interleaved prompt is prefilled per version
                if take and cost > budget:
                    break
                # Rows are padded to the longest, so the cache costs rows x longest (a lone row always fits:
                # the limits keep one request within the budget).
                longest = max(longest, _reserved(nxt))
                if rows and (rows + nxt.n) * longest * self._position_cost > self.config.max_batch_tokens:
                    break
                rows += nxt.n
                take.append(self._waiting.popleft())
                free -= nxt.n
                budget -= cost
            metrics.QUEUE_DEPTH.set(len(self._waiting))
        if take:
            try:
                self._prefill(take)
            except Exception:
                log.exception("prefill failed", extra={"requests": len(take)})
                for req in take:
                    finish_request(req, RlhfError(GENERATION_FAILED))
                metrics.REQUESTS_FINISHED.labels("failed").inc(len(take))

    def _adapter_of(self, version: str) -> str:
        return self._adapters.get(version, BASE)

    def _forward(self, adapters: list[str], **kw: Any) -> torch.Tensor:
        """Model forward; a PEFT model gets one adapter name per row (mixed-version batch).

        PEFT's mixed-batch path splits every LoRA layer's input by adapter, which costs extra on
        each step; when all rows share one version (the usual case between swaps) the plain path
        with that adapter active (or adapters disabled, for the base) computes the same thing faster.
        """
        if not self._adapters:
            return self.model(**kw).logits[:, -1, :]
        if len(set(adapters)) > 1:
            return self._mixed_forward(adapters, **kw)
        if adapters[0] == BASE:
            if any(sig is None for sig in self._slot_signatures.values()):
                # PEFT built more than LoRA layers (modules to save, ...): its own switch turns those off too.
                with self.model.disable_adapter():
                    return self.model(**kw).logits[:, -1, :]
            self._enable(False)
            return self.model(**kw).logits[:, -1, :]
        self._activate([adapters[0]])
        return self.model(**kw).logits[:, -1, :]

    def _layers(self) -> dict[str, Any]:
        """The model's LoRA layers by module name, found once per change of the layers rather than every step."""
        if self._lora_layers is None:
            self._lora_layers = lora_slots.lora_layers(self.model)
        return self._lora_layers

    def _enable(self, enabled: bool) -> None:
        """Switch every LoRA layer's adapters on or off, only when that changes.

        Not PEFT's `disable_adapter()` context: it walks every module of the model twice per call
        to check and restore the layers' state, 24 ms of a 100-ms decode step of 24 rows (SmolLM2
        bf16, one thread) whenever a batch of bare-base rows ran beside a resident adapter.
        """
        if self._enabled != enabled:
            for layer in self._layers().values():
                layer.enable_adapters(enabled)
            self._enabled = enabled
            if enabled:
                self._active = None  # enable_adapters(True) re-applies the layers' own active adapters

    def _activate(self, names: list[str]) -> None:
        """Make `names` the active adapters of every LoRA layer (PEFT's set_adapter walks every module: ~7 ms)."""
        self._enable(True)
        if self._active != names:
            for layer in self._layers().values():
                layer.set_adapter(names, inference_mode=True)
            self._active = names

    def _mixed_forward(self, adapters: list[str], **kw: Any) -> torch.Tensor:
        """A batch of several versions (the bare base among them, or not), each row computed with its own.

        PEFT's own mixed batch (`adapter_names=`) registers hooks on every LoRA layer per call and
        gathers and scatters each adapter's rows in every layer: a decode step of 16 rows on two
        versions took 97 ms against 70 ms on one (SmolLM2 bf16, 2 threads). Instead:
        - one adapter beside base rows (a canary beside the bare base): the layers' plain path,
          result + B(A(x)) * scaling, with the scaling made a [rows, 1, 1] tensor that is 0 on the
          base rows (put back afterwards): one LoRA pass per layer, and the adapter rows' floats
          exactly those of a batch on that adapter alone;
        - two adapters or more (a swap's old and new rows, a canary beside a stable adapter): their
          stacked matrices, again one LoRA pass per layer (`lora_mix`), where every version active
          would cost one pass per version (+10-12% a step at two);
        - adapters with more than A and B (no `lora_slots` signature: DoRA, ...): PEFT's path.
        """
        names = sorted(set(adapters) - {BASE})
        if any(self._slot_signatures[n] is None for n in names):  # DoRA and the like: scaling is not a plain factor
            self._activate(names)  # PEFT's mixed path adds nothing while the layers are switched off
            return self.model(**kw, adapter_names=adapters).logits[:, -1, :]
        if len(names) > 1:
            if self._mix is None or self._mix.names != tuple(names):
                self._mix = lora_mix.MixedLora(self._layers(), names)
            self._enable(False)
            self.stats["stacked_passes"] += 1
            with self._mix.applied(adapters):
                return self.model(**kw).logits[:, -1, :]
        dtype = next(self.model.parameters()).dtype
        masks = {n: torch.tensor([float(a == n) for a in adapters], dtype=dtype, device=self.device).view(-1, 1, 1)
                 for n in names}
        self._activate(names)
        saved = [(layer, n, layer.scaling[n]) for layer in self._layers().values() for n in names if n in layer.scaling]
        try:
            for layer, n, scale in saved:
                layer.scaling[n] = masks[n] * scale
            return self.model(**kw).logits[:, -1, :]
        finally:
            for layer, n, scale in saved:
                layer.scaling[n] = scale

    def _prefill(self, reqs: list[GenerationRequest]) -> None:
        """Run the prompts of new requests (left-padded together), sample each candidate's first token."""
        # One prefill row per (request, version): candidates on one version share it, while an
        # interleaved request (canary and stable candidates) needs one per version, since the
        # adapters change the keys and values of the prompt too.
        units = [(i, v) for i, r in enumerate(reqs) for v in dict.fromkeys(r.versions)]
        unit_of = {u: j for j, u in enumerate(units)}
        length = max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(len(units), length, dtype=torch.long)
        mask = torch.zeros(len(units), length, dtype=torch.long)
        for j, (i, _) in enumerate(units):
            ids[j, length - len(reqs[i].prompt_ids):] = torch.tensor(reqs[i].prompt_ids)
            mask[j, length - len(reqs[i].prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward([self._adapter_of(v) for _, v in units], input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device), position_ids=positions.to(self.device),
                               past_key_values=cache, use_cache=True, logits_to_keep=1)  # [units, V]
        metrics.PROMPT_TOKENS.inc(sum(len(r.prompt_ids) for r in reqs))
        self.stats["prefills"] += 1
        # Candidates share their unit's prefill: repeat each unit's cache row once per candidate on it.
        expand = [unit_of[(i, r.versions[k])] for i, r in enumerate(reqs) for k in range(r.n)]
        idx = torch.tensor(expand)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))
            layer.values = layer.values.index_select(0, idx.to(layer.values.device))
        rows = []
        for r in reqs:
            r.remaining = r.n
            for k in range(r.n):
                seed = None if r.params.seed is None else r.params.seed + k
                rows.append(_Row(r, k, IncrementalText(self.tokenizer, r.params.stop), make_generator(seed),
                                 self._adapter_of(r.versions[k])))
        logits = logits.index_select(0, idx.to(logits.device))
        new = KVBatch(cache, mask.index_select(0, idx).to(self.device),
                      torch.tensor([len(reqs[units[j][0]].prompt_ids) for j in expand], device=self.device),
                      torch.zeros(len(expand), dtype=torch.long, device=self.device), self._cache_dtype)
        tokens = sample_rows(logits, [r.request.params for r in rows], [r.generator for r in rows])
        new.next_tokens = torch.tensor(tokens, device=self.device)
        if self._batch is None:
            self._batch = new
        else:
            self._batch.merge(new)
        self._rows.extend(rows)
        metrics.RUNNING_ROWS.set(len(self._rows))
        self._accept(rows, tokens)

    def _decode(self) -> None:
        """One token for every running row."""
        batch = self._batch
        assert batch is not None
        metrics.BATCH_SIZE.observe(batch.size)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], batch.size)
        logits = self._forward([r.adapter for r in self._rows], **batch.step_inputs())
        batch.positions += 1
        tokens = sample_rows(logits, [r.request.params for r in self._rows], [r.generator for r in self._rows])
        batch.next_tokens = torch.tensor(tokens, device=self.device)
        self._accept(self._rows, tokens)

    def _accept(self, rows: list[_Row], tokens: list[int]) -> None:
        """Feed sampled tokens to their rows: emit text, decide who finished, free finished slots."""
        now = time.monotonic()
        metrics.TOKENS_GENERATED.inc(len(tokens))
        positions = self._batch.positions.tolist() if self._batch is not None else []
        offset = len(self._rows) - len(rows)  # rows are the tail of self._rows
        for j, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            req = row.request
            if req.first_token_at is None:
                req.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.observe(now - req.submitted_at)
            row.tokens += 1
            row.ids.append(tok)
            if tok in self.eos_ids:
                row.finish = FINISH_EOS
            elif row.text.add(tok):
                row.finish = FINISH_STOP
            elif row.tokens >= req.params.max_new_tokens or positions[offset + j] + 1 >= self.max_context:
                row.finish = FINISH_LENGTH
            delta = row.text.delta(final=row.finish is not None)
            if delta or row.finish:
                req.emit(TextEvent(row.index, delta, row.finish, row.tokens if row.finish else 0,
                                   tuple(row.ids[row.sent:])))
                row.sent = len(row.ids)
            if row.finish:
                req.remaining -= 1
                if req.remaining == 0:
                    metrics.REQUESTS_FINISHED.labels("ok").inc()
                    finish_request(req)
        if any(r.finish for r in rows):
            self._compact()

    def _compact(self) -> None:
        """Remove finished rows from the batch."""
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        else:
            assert self._batch is not None
            self._batch.select(keep)
        metrics.RUNNING_ROWS.set(len(self._rows))

    def _fail_all(self, error: RlhfError) -> int:
        """Fail every queued and running request with `error` and reset the batch; returns how many."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        reqs = {id(r.request): r.request for r in self._rows if r.finish is None}
        for req in [*waiting, *reqs.values()]:
            finish_request(req, error)
        self._rows, self._batch = [], None
        metrics.RUNNING_ROWS.set(0)
        metrics.QUEUE_DEPTH.set(0)
        return len(waiting) + len(reqs)
