"""The Reward gRPC service: protobuf in, RewardRuntime calls, protobuf out."""

from __future__ import annotations

import grpc

from rlhf_online.config import RewardSettings
from rlhf_online.reward.runtime import RewardRuntime
from rlhf_online.v1 import reward_pb2 as pb
from rlhf_online.v1 import reward_pb2_grpc as pb_grpc
from services.server import RunningServer, start_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reward"].full_name
ADMIN_METHODS = {f"/{SERVICE_NAME}/Train"}


class RewardServicer(pb_grpc.RewardServicer):
    """Score, Train, GetRewardModel."""

    def __init__(self, runtime: RewardRuntime) -> None:
        self.runtime = runtime

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        """Scores of every item, in one batch."""
        items = request.items
        scores, version = self.runtime.score([i.prompt for i in items], [i.completion for i in items],
                                             [i.completion_id for i in items])
        return pb.ScoreResponse(scores=scores, reward_model_version=version)

    def Train(self, request: pb.TrainRewardRequest, context: grpc.ServicerContext) -> pb.TrainRewardResponse:
        """Retrain from the store now; promoted only past the accuracy gate."""
        manifest, promoted, reason = self.runtime.train()
        info = pb.RewardModelInfo(version=manifest.get("version", ""), metrics=manifest.get("metrics", {}),
                                  feedback_seen=manifest.get("feedback_seen", 0))
        return pb.TrainRewardResponse(model=info, promoted=promoted, reason=reason)

    def GetRewardModel(self, request: pb.GetRewardModelRequest, context: grpc.ServicerContext) -> pb.RewardModelInfo:
        """The reward served now, with the learned part's held-out metrics."""
        version, metrics, seen = self.runtime.info()
        return pb.RewardModelInfo(version=version, metrics=metrics, feedback_seen=seen)


def start_reward_server(settings: RewardSettings, runtime: RewardRuntime) -> RunningServer:
    """Start the service and its background retrainer."""
    running = start_server(settings, [SERVICE_NAME], lambda s: pb_grpc.add_RewardServicer_to_server(
        RewardServicer(runtime), s), workers=16, admin_methods=ADMIN_METHODS)
    runtime.start_retrainer()
    running.on_drain.append(runtime.stop)
    running.on_stopped.append(runtime.store.close)
    return running
