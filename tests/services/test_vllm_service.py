"""The Generation service on vLLM (`make test-vllm`): hot-swaps under load lose nothing and never go back.

`rlhf-online serve generation` with RLHF_ENGINE=vllm as a child process (this venv's interpreter),
four clients generating without a pause while CURRENT moves through six versions.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from support import wait_for

from rlhf_online import launch
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.adapters.synthetic import write_random_lora
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SWAPS, CLIENTS = 6, 4


def number(version: str) -> int:
    """v000003 -> 3; the bare base "" -> 0."""
    return int(version[1:]) if version else 0


def test_six_swaps_under_four_clients_fail_nothing(smollm_dir, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    versions = [registry.publish(lambda d, k=k: write_random_lora(d, smollm_dir, rank=8, seed=k), base_model=str(smollm_dir))
                for k in range(SWAPS)]
    env = {"RLHF_ENGINE": "vllm", "RLHF_BASE_MODEL": str(smollm_dir), "RLHF_DATA_DIR": str(tmp_path),
           "RLHF_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}", "RLHF_ADAPTER_DIR": str(registry.root),
           "RLHF_DTYPE": "auto", "RLHF_MAX_BATCH_SIZE": "8"}  # auto: bf16 only where the CPU runs it natively
    with launch.running("generation", env, tmp_path) as service:
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(service.address))
        served = lambda: stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).version  # noqa: E731
        stop = threading.Event()
        failures: list[str] = []
        backwards: list[tuple[str, str]] = []
        seen: set[str] = set()
        done = [0] * CLIENTS

        def client(i: int) -> None:
            while not stop.is_set():
                before = served()  # the version current when this request starts (or an older one)
                try:
                    r = stub.Generate(pb.GenerateRequest(
                        prompt=f"Say something about swap {i}.", user_id=f"u{i}",
                        params=pb.SamplingParams(max_new_tokens=24, temperature=1.0)), timeout=120)
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")
                    continue
                seen.add(r.policy_version)
                if number(r.policy_version) < number(before):
                    backwards.append((before, r.policy_version))
                done[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            for v in versions:
                registry.activate(v)
                wait_for(lambda v=v: served() == v, 60, f"the service to serve {v}")
                wait_for(lambda v=v: v in seen, 60, f"a reply from {v} before the next swap")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
    print(f"vllm hot-swap: {sum(done)} requests by {CLIENTS} clients over {SWAPS} swaps, {len(failures)} failed, "
          f"{len(backwards)} on a version older than the one served at their start")
    assert failures == []
    assert backwards == []
    assert sum(done) >= SWAPS * CLIENTS
    assert set(versions) <= seen
    assert service.log_tail(200_000).count("policy switched") >= SWAPS
