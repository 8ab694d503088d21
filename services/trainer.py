"""The Trainer gRPC service: rounds on demand and in the background, the policy registry, promotion."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.config import TrainerSettings
from rlhf_online.errors import Unavailable
from rlhf_online.mainthread import MainThreadRunner
from rlhf_online.ppo.trainer import RoundResult, Trainer
from rlhf_online.tls import ClientTLS, channel
from rlhf_online.v1 import generation_pb2 as gen_pb
from rlhf_online.v1 import reward_pb2, reward_pb2_grpc
from rlhf_online.v1 import trainer_pb2 as pb
from rlhf_online.v1 import trainer_pb2_grpc as pb_grpc
from services.server import RunningServer, start_server

log = logging.getLogger("rlhf_online.trainer")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trainer"].full_name
ADMIN_METHODS = {f"/{SERVICE_NAME}/RunRound", f"/{SERVICE_NAME}/ActivatePolicy"}


# A reward service that restarts is reached again within seconds: grpc's reconnect backoff would grow to 2 minutes.
REWARD_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]


def reward_channel(addr: str, tls: ClientTLS | None = None) -> grpc.Channel:
    """The trainer's channel to the Reward service: TLS when `tls` is given."""
    return channel(addr, tls, REWARD_CHANNEL_OPTIONS)


def reward_of(settings: TrainerSettings) -> tuple[Callable, Callable[[], str]]:
    """The reward client and readiness check of a trainer, as its settings configure them (TLS included)."""
    return (reward_client(settings.reward_addr, tls=settings.reward_tls),
            reward_readiness(settings.reward_addr, settings.admin_token, tls=settings.reward_tls))


def reward_client(addr: str, timeout: float = 300.0, *, tls: ClientTLS | None = None):
    """Score completions through the Reward service (waiting up to `timeout` for it to be reachable)."""
    stub = reward_pb2_grpc.RewardStub(reward_channel(addr, tls))

    def score(prompts, completions, completion_ids=None) -> list[float]:
        # A logged completion's id lets the service reward it by its users' ratings ("" = the text alone).
        ids = [""] * len(completions) if completion_ids is None else completion_ids
        items = [reward_pb2.ScoreItem(prompt=p, completion=c, completion_id=i or "")
                 for p, c, i in zip(prompts, completions, ids, strict=True)]
        try:
            return list(stub.Score(reward_pb2.ScoreRequest(items=items), timeout=timeout, wait_for_ready=True).scores)
        except grpc.RpcError as e:  # the round fails with this as its reason (not grpc's debug string)
            raise Unavailable(f"the reward service at {addr} did not score: {e.code().name}: {e.details()}") from None

    return score


def reward_readiness(addr: str, admin_token: str = "", timeout: float = 30.0, ask_every: float = 30.0, *,
                     tls: ClientTLS | None = None):
    """Why the Reward service's scores are not usable yet ("" once they are): no learned model trained so far.

    With none, it asks the service to train one now (at most every `ask_every` seconds): its own
    retrainer waits for a batch of new feedback, while an operator's RunRound should not wait for that.
    """
    stub = reward_pb2_grpc.RewardStub(reward_channel(addr, tls))
    metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else None
    last_ask = [float("-inf")]

    def not_ready() -> str:
        try:
            if stub.GetRewardModel(reward_pb2.GetRewardModelRequest(), timeout=timeout, wait_for_ready=True).version:
                return ""
        except grpc.RpcError as e:  # down or unreachable for `timeout` s: this round waits for it rather than failing
            return f"the reward service at {addr} is unreachable: {e.code().name}"
        waiting = "the reward service has no trained reward model yet"
        if time.monotonic() - last_ask[0] < ask_every:
            return waiting
        last_ask[0] = time.monotonic()
        try:
            r = stub.Train(reward_pb2.TrainRewardRequest(), timeout=600, metadata=metadata)
        except grpc.RpcError as e:
            return f"{waiting}; asking it to train one failed: {e.code().name}: {e.details()}"
        if r.promoted:
            log.info("asked the reward service for a first model", extra={"version": r.model.version})
            return ""
        return f"{waiting} ({r.reason or 'not promoted'})"

    return not_ready


def _round_pb(r: RoundResult) -> pb.RoundResult:
    return pb.RoundResult(outcome=r.outcome, version=r.version, reason=r.reason, metrics=r.metrics)


class TrainerServicer(pb_grpc.TrainerServicer):
    """GetStatus, RunRound, ListPolicies, ActivatePolicy."""

    def __init__(self, trainer: Trainer, registry: AdapterRegistry, runner: MainThreadRunner) -> None:
        self.trainer, self.registry, self.runner = trainer, registry, runner

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.TrainerStatus:
        """Where the trainer stands."""
        t = self.trainer
        return pb.TrainerStatus(current=self.registry.current(), canary=self.registry.canary(),
                                round_in_progress=t.in_progress.is_set(),
                                rounds_total=t.rounds_total, last_round=_round_pb(t.last),
                                feedback_since_last_round=t.feedback_since_last_round())

    def RunRound(self, request: pb.RunRoundRequest, context: grpc.ServicerContext) -> pb.RoundResult:
        """One round now (queued behind a running one)."""
        return _round_pb(self.runner.call(self.trainer.run_round))

    def ListPolicies(self, request: pb.ListPoliciesRequest, context: grpc.ServicerContext) -> pb.ListPoliciesResponse:
        """Every published version with its metrics, and which ones CURRENT and CANARY name."""
        return pb.ListPoliciesResponse(current=self.registry.current(), canary=self.registry.canary(), policies=[
            gen_pb.Policy(version=m["version"], base_model=m["base_model"], metrics=m.get("metrics", {}))
            for m in self.registry.describe()])

    def ActivatePolicy(self, request: pb.ActivatePolicyRequest, context: grpc.ServicerContext) -> gen_pb.Policy:
        """Promote or roll back by hand: CURRENT names `version` ("" = the bare base); replicas follow within a poll.

        Naming the canary promotes it; the canary controller records either as an operator's decision.
        """
        if self.trainer.canary is not None:
            self.trainer.canary.activate(request.version)  # under the controller's lock: no step promotes over it
        else:
            self.registry.activate(request.version)
        if not request.version:
            return gen_pb.Policy(version="", base_model=self.trainer.base_model)
        m = self.registry.manifest(request.version)
        return gen_pb.Policy(version=m["version"], base_model=m["base_model"], metrics=m.get("metrics", {}))


def start_trainer_server(settings: TrainerSettings, trainer: Trainer, registry: AdapterRegistry,
                         runner: MainThreadRunner) -> RunningServer:
    """Start the service and the background loop that runs a round when one is due."""
    running = start_server(settings, [SERVICE_NAME], lambda s: pb_grpc.add_TrainerServicer_to_server(
        TrainerServicer(trainer, registry, runner), s), workers=16, admin_methods=ADMIN_METHODS)
    stop = threading.Event()

    def loop() -> None:
        last = time.time()
        # Check every 5 s, or sooner when rounds are meant to run back to back.
        pause = min(5.0, trainer.config.round_interval_seconds or 5.0)
        while not stop.wait(pause):
            try:
                if trainer.due(last):
                    runner.call(trainer.run_round)
                    last = time.time()
            except Exception:
                log.exception("background round failed")

    threading.Thread(target=loop, name="round-scheduler", daemon=True).start()
    if trainer.canary is not None:
        trainer.canary.start()
        running.on_drain.append(trainer.canary.stop)
    running.on_drain.append(stop.set)
    running.busy.append(trainer.in_progress.is_set)
    running.on_stopped.extend([runner.stop, trainer.store.close])
    return running
