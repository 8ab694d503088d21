"""From validated settings to a running service: threads, model, engine, store, server."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
from pathlib import Path

import torch

from rlhf_online import config
from rlhf_online.config import CommonSettings, GenerationSettings, RewardSettings, TrainerSettings
from rlhf_online.engine.engine import Engine
from rlhf_online.engine.interface import EngineConfig, ServingEngine
from rlhf_online.engine.request import Limits
from rlhf_online.models.provision import load_model, pick_dtype, resolve_base_model
from rlhf_online.store import open_store

log = logging.getLogger("rlhf_online.bootstrap")


def set_threads(settings: CommonSettings) -> None:
    """Torch intra-op threads: the configured share of the cores, so co-located services don't oversubscribe."""
    threads = settings.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    log.info("torch threads", extra={"threads": threads})


def freeze_startup_heap() -> None:
    """Leave what start-up built (model, transformers, grpc, the store) out of the collector's full collections.

    A serving process holds some 400k long-lived Python objects once SmolLM2 is loaded, and a full
    (generation-2) collection walks them all: 140-150 ms with two adapters loaded (~440k objects,
    AMX Xeon, 2 cores), during which the thread that triggered it holds the GIL and every running
    row waits. Bursts of allocation, such as a swap's validation and load, can set one off; in a
    30-minute soak the slowest requests were those in flight during a swap, and after the freeze
    they no longer were (docs/benchmarks.md; the collections themselves were not timed there).
    Frozen, a full collection walks only what was made since. Reference counting still frees frozen
    objects; cycles among them are never collected, which suits state that lives as long as the process.
    """
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen", extra={"objects": gc.get_freeze_count()})


def engine_config(settings: GenerationSettings) -> EngineConfig:
    """Engine capacity and request limits from the service settings."""
    return EngineConfig(max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                        max_queue=settings.max_queue,
                        limits=Limits(max_prompt_tokens=settings.max_prompt_tokens,
                                      max_new_tokens=settings.max_new_tokens,
                                      max_n=min(settings.max_n, settings.max_batch_size)))


def build_engine(settings: GenerationSettings) -> ServingEngine:
    """Resolve (fetching the default once) and load the base model; the caller starts or runs the engine."""
    path = resolve_base_model(settings.base_model, Path(settings.data_dir))
    if settings.engine == "vllm":
        return build_vllm_engine(settings, path)
    dtype = pick_dtype(settings.dtype, settings.device)
    model, tokenizer = load_model(path, device=settings.device, dtype=dtype)
    log.info("model loaded", extra={"path": str(path), "device": settings.device, "dtype": str(dtype)})
    return Engine(model, tokenizer, engine_config(settings))


def build_vllm_engine(settings: GenerationSettings, path: Path) -> ServingEngine:
    """vLLM's engine on the base model, started (it takes requests when this returns)."""
    from rlhf_online.engine.vllm_engine import VllmEngine, VllmOptions
    from rlhf_online.models.provision import load_tokenizer

    options = VllmOptions(dtype=settings.dtype, max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
                          tensor_parallel_size=settings.tensor_parallel_size,
                          gpu_memory_utilization=settings.gpu_memory_utilization)
    log.info("starting vLLM", extra={"path": str(path), "dtype": settings.dtype, "max_loras": settings.max_loras,
                                     "tensor_parallel_size": settings.tensor_parallel_size})
    return VllmEngine(path, load_tokenizer(path), engine_config(settings), options).start()


def run_generation(settings: GenerationSettings) -> int:
    """`rlhf-online serve generation`: serve until SIGTERM, then drain and exit 0."""
    from services.generation import start_generation_server

    set_threads(settings)
    store = open_store(settings.store_url)
    engine = build_engine(settings)
    freeze_startup_heap()
    running = start_generation_server(settings, engine, store)
    running.shutdown_on_signal(settings.grace_seconds)
    engine.run()  # the decode loop owns the main thread until shutdown stops the engine
    running.stopped.wait()
    return 0


def run_reward(settings: RewardSettings) -> int:
    """`rlhf-online serve reward`: serve until SIGTERM, then drain and exit 0."""
    from rlhf_online.reward.runtime import RewardConfig, RewardRuntime
    from services.reward import start_reward_server

    set_threads(settings)
    runtime = RewardRuntime(config.project(RewardConfig, settings), open_store(settings.store_url))
    freeze_startup_heap()
    running = start_reward_server(settings, runtime)
    running.on_stopped.append(runtime.runner.stop)
    running.shutdown_on_signal(settings.grace_seconds)
    runtime.runner.run_forever()  # scoring owns the main thread until shutdown
    running.stopped.wait()
    return 0


def run_trainer(settings: TrainerSettings) -> int:
    """`rlhf-online serve trainer`: rounds run on the main thread until SIGTERM.

    Under torchrun (WORLD_SIZE > 1) rank 0 is the service and the other ranks follow its rounds.
    """
    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.canary.controller import CanaryController
    from rlhf_online.mainthread import MainThreadRunner
    from rlhf_online.ppo import distributed
    from rlhf_online.ppo.trainer import Trainer, follow, load_base_model
    from services.server import start_server
    from services.trainer import reward_of, start_trainer_server

    set_threads(settings)
    ranks = distributed.from_environment()
    base = load_base_model(resolve_base_model(settings.base_model, Path(settings.data_dir)), settings.device)
    if not ranks.is_leader:  # no API, no store, no reward client: rank 0's rounds, forward passes and updates
        log.info("trainer rank following rank 0", extra={"rank": ranks.rank, "world": ranks.world})
        # Health and metrics only, for the probes every rank's pod shares; on one machine a local rank's
        # ports are rank 0's plus its local rank, so that they do not collide.
        local = int(os.environ.get("LOCAL_RANK", "0"))
        own = dataclasses.replace(settings, port=settings.port and settings.port + local,
                                  metrics_port=settings.metrics_port and settings.metrics_port + local)
        running = start_server(own, [], lambda server: None, workers=2)
        try:
            follow(settings.ppo, base, ranks)
        except distributed.RanksLost:  # rank 0 is gone: exit non-zero, the supervisor starts the group again
            log.error("trainer rank 0 is gone; exiting for a restart", extra={"rank": ranks.rank})
            return 1
        finally:
            running.shutdown(0)
        return 0
    registry = AdapterRegistry(settings.adapter_dir)
    store = open_store(settings.store_url)
    canary = (CanaryController(settings.canary_controller, settings.canary_test, registry, store)
              if settings.canary_controller.canary else None)
    score, not_ready = reward_of(settings)
    trainer = Trainer(settings.trainer, settings.ppo, store, registry, score, base, base_model=settings.base_model,
                      reward_not_ready=not_ready, heldout_percent=settings.heldout_percent, canary=canary,
                      ranks=ranks)
    runner = MainThreadRunner()
    running = start_trainer_server(settings, trainer, registry, runner)
    running.shutdown_on_signal(settings.grace_seconds)
    if ranks.world > 1:  # a lost rank ends this process too: the group restarts whole (torchrun, Kubernetes)
        def exit_when_ranks_lost() -> None:
            trainer.ranks_lost.wait()
            running.shutdown(settings.grace_seconds)

        threading.Thread(target=exit_when_ranks_lost, name="ranks-lost", daemon=True).start()
    runner.run_forever()
    running.stopped.wait()
    if trainer.ranks_lost.is_set():
        log.error("a trainer rank is gone; exiting for a restart of the group")
        return 1
    try:
        trainer.release_followers()
    except Exception as e:  # torchrun stopping the group may have stopped the other ranks first
        log.info("the other ranks were gone at shutdown", extra={"error": type(e).__name__})
    return 0
