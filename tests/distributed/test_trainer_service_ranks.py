"""`torchrun --nproc-per-node 2 -m services.cli serve trainer`: one Trainer service on two ranks, through its API."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online import launch
from rlhf_online.store import CompletionRecord, open_store
from rlhf_online.v1 import reward_pb2, reward_pb2_grpc
from rlhf_online.v1 import trainer_pb2 as pb
from rlhf_online.v1 import trainer_pb2_grpc as pb_grpc


class FlatReward(reward_pb2_grpc.RewardServicer):
    """A reward service that scores every reply 0 (the gate sees no drop) and has a model."""

    def Score(self, request, context):
        return reward_pb2.ScoreResponse(scores=[0.0] * len(request.items), reward_model_version="r000001")

    def GetRewardModel(self, request, context):
        return reward_pb2.RewardModelInfo(version="r000001")


@pytest.mark.slow
def test_two_ranks_serve_one_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    reward = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServicer_to_server(FlatReward(), reward)
    reward_port = reward.add_insecure_port("127.0.0.1:0")
    reward.start()
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about thing {i}.",
                                                messages=(), text="ok", policy_version="") for i in range(12)])
    env = {"RLHF_BASE_MODEL": str(tiny_model_dir), "RLHF_DATA_DIR": str(tmp_path),
           "RLHF_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}", "RLHF_REWARD_ADDR": f"127.0.0.1:{reward_port}",
           "RLHF_ROUND_INTERVAL_SECONDS": "0", "RLHF_ROUND_MIN_FEEDBACK": "0", "RLHF_ROUND_MIN_TRAFFIC": "0",
           "RLHF_LEARN_FROM_TRAFFIC": "false", "RLHF_BATCH_SIZE": "4", "RLHF_RESPONSE_LENGTH": "6",
           "RLHF_EVAL_PROMPTS": "4", "RLHF_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        with launch.running("trainer", env, tmp_path, ranks=2, stop_timeout=60) as trainer:
            # Rank 1 answers health on rank 0's port + 1 (one machine: ports offset by the local rank).
            with grpc.insecure_channel(f"127.0.0.1:{trainer.port + 1}") as ch:
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60,
                                                               wait_for_ready=True)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as ch:
                stub = pb_grpc.TrainerStub(ch)
                r = stub.RunRound(pb.RunRoundRequest(), timeout=300)
                assert r.outcome == "published" and r.version == "v000001", r
                assert r.metrics["trainer/ranks"] == 2.0
                r2 = stub.RunRound(pb.RunRoundRequest(), timeout=300)  # the follower is back for the next
                assert r2.outcome == "published" and r2.version == "v000002", r2
                assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).rounds_total == 2
        assert "trainer rank following rank 0" in trainer.log_tail(200_000)
    finally:
        reward.stop(0)
