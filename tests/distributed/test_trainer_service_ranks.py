"""`torchrun … -m services.cli serve trainer`: one Trainer service on two ranks, through its API; and a lost rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import flat_reward_server

from rlhf_online import launch
from rlhf_online.store import CompletionRecord, open_store
from rlhf_online.v1 import trainer_pb2 as pb
from rlhf_online.v1 import trainer_pb2_grpc as pb_grpc


def trainer_env(tiny_model_dir: Path, tmp_path: Path, reward: str) -> dict[str, str]:
    """A trainer on the tiny model over a SQLite store of 12 logged prompts, rounds only when asked."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(store_url) as store:
        store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about thing {i}.",
                                                messages=(), text="ok", policy_version="") for i in range(12)])
    return {"RLHF_BASE_MODEL": str(tiny_model_dir), "RLHF_DATA_DIR": str(tmp_path), "RLHF_STORE_URL": store_url,
            "RLHF_REWARD_ADDR": reward, "RLHF_ROUND_INTERVAL_SECONDS": "0", "RLHF_ROUND_MIN_FEEDBACK": "0",
            "RLHF_ROUND_MIN_TRAFFIC": "0", "RLHF_LEARN_FROM_TRAFFIC": "false", "RLHF_BATCH_SIZE": "4",
            "RLHF_RESPONSE_LENGTH": "6", "RLHF_EVAL_PROMPTS": "4", "RLHF_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}


def wait_serving(port: int, timeout: float = 120) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                                       wait_for_ready=True)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(p := todo.pop())
        todo += children.get(p, [])
    return tree


def kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        with suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_two_ranks_serve_one_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    with flat_reward_server() as reward, launch.running("trainer", trainer_env(tiny_model_dir, tmp_path, reward),
                                                         tmp_path, ranks=2, stop_timeout=60) as trainer:
        wait_serving(trainer.port + 1)  # rank 1 answers health on rank 0's port + 1 (one machine: + local rank)
        with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as ch:
            stub = pb_grpc.TrainerStub(ch)
            r = stub.RunRound(pb.RunRoundRequest(), timeout=300)
            assert r.outcome == "published" and r.version == "v000001", r
            assert r.metrics["trainer/ranks"] == 2.0
            r2 = stub.RunRound(pb.RunRoundRequest(), timeout=300)  # the follower is back for the next
            assert r2.outcome == "published" and r2.version == "v000002", r2
            assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).rounds_total == 2
    assert "trainer rank following rank 0" in trainer.log_tail(200_000)


@contextmanager
def two_pods(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen], tuple[int, int]]]:
    """Two torchrun agents with a static rendezvous, one rank each, as the Kubernetes overlay runs them (one per
    pod, each with its own ports); yields the agents and the ranks' gRPC ports once both serve health."""
    master, ports = launch.free_port(), (launch.free_port(), launch.free_port())
    nodes: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   f"--node-rank={rank}", "--master-addr", "127.0.0.1", "--master-port", str(master),
                   "--max-restarts", "0", "-m", "services.cli", "serve", "trainer"]
            node_env = {**os.environ, **env, "RLHF_PORT": str(ports[rank]), "RLHF_METRICS_PORT": "0"}
            with open(tmp_path / f"node{rank}.log", "w") as log:
                nodes.append(subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT))
        wait_serving(ports[1])
        wait_serving(ports[0])
        yield nodes, ports
    finally:
        for node in nodes:
            kill_tree(node.pid)
            node.wait(30)


@pytest.mark.slow
def test_a_lost_follower_fails_the_round_and_ends_the_group(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 1's pod gone: rank 0's next round fails, recorded, nothing published, and rank 0 exits non-zero
    so that its supervisor (Kubernetes, torchrun) starts the group again."""
    with flat_reward_server() as reward, two_pods(trainer_env(tiny_model_dir, tmp_path, reward), tmp_path) as (
            nodes, ports), grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as ch:
        stub = pb_grpc.TrainerStub(ch)
        r = stub.RunRound(pb.RunRoundRequest(), timeout=300)
        assert r.outcome == "published" and r.metrics["trainer/ranks"] == 2.0, r
        kill_tree(nodes[1].pid)  # its agent and its worker
        nodes[1].wait(30)
        lost = stub.RunRound(pb.RunRoundRequest(), timeout=300)
        assert lost.outcome == "rejected" and "another rank of this trainer is gone" in lost.reason, lost
        assert nodes[0].wait(120) != 0
        assert "a trainer rank is gone; exiting for a restart of the group" in (tmp_path / "node0.log").read_text()
        assert sorted(p.name for p in (tmp_path / "adapters").glob("v*")) == ["v000001"]  # nothing partial


@pytest.mark.slow
def test_a_lost_rank_0_ends_its_followers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0's pod gone: the follower, waiting for the next round, exits non-zero instead of waiting forever."""
    with flat_reward_server() as reward, two_pods(trainer_env(tiny_model_dir, tmp_path, reward), tmp_path) as (
            nodes, _):
        kill_tree(nodes[0].pid)
        nodes[0].wait(30)
        assert nodes[1].wait(120) != 0
        assert "trainer rank 0 is gone; exiting for a restart" in (tmp_path / "node1.log").read_text()
