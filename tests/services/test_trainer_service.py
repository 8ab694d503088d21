"""The Trainer gRPC service on the tiny model: rounds, the gate, the registry, promotion, auth."""

from __future__ import annotations

import copy

import grpc
import pytest

from rlhf_online import config
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.canary.controller import CanaryController
from rlhf_online.config import TrainerSettings
from rlhf_online.mainthread import MainThreadRunner
from rlhf_online.ppo.trainer import Trainer, gate
from rlhf_online.store import CompletionRecord, open_store
from rlhf_online.v1 import trainer_pb2 as pb
from rlhf_online.v1 import trainer_pb2_grpc as pb_grpc
from services.trainer import start_trainer_server


def length_reward(prompts, texts, completion_ids=()):
    """A scripted reward: longer replies score higher (the gate only needs it not to drop)."""
    return [len(t) / 100 for t in texts]


@pytest.fixture
def trainer(tiny, tmp_path):
    servers = []

    def start(prompts: int = 12, reward=length_reward, canary: bool = False, **overrides):
        settings = config.assemble(TrainerSettings, dict(
            port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path, base_model="tiny",
            store_url=f"sqlite:///{tmp_path / 'store.db'}", round_interval_seconds=0, round_min_feedback=0,
            batch_size=4, response_length=6, eval_prompts=4, **overrides))
        store = open_store(settings.store_url)
        store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about thing {i}.", messages=(),
                                                text="ok", policy_version="") for i in range(prompts)])
        registry = AdapterRegistry(settings.adapter_dir)
        controller = (CanaryController(settings.canary_controller, settings.canary_test, registry, store)
                      if canary else None)
        t = Trainer(settings.trainer, settings.ppo, store, registry, reward, lambda: (copy.deepcopy(tiny[0]), tiny[1]),
                    base_model=settings.base_model, canary=controller)
        running = start_trainer_server(settings, t, registry, MainThreadRunner())
        servers.append(running)
        return pb_grpc.TrainerStub(grpc.insecure_channel(f"127.0.0.1:{running.port}")), registry

    yield start
    for s in servers:
        s.shutdown(1)


def flat_reward(prompts, texts, completion_ids=()):
    """A reward that never changes: the gate sees no drop, so every round within the KL budget publishes."""
    return [0.0] * len(texts)


def test_rounds_publish_list_and_activate(trainer):
    stub, registry = trainer(reward=flat_reward)
    r = stub.RunRound(pb.RunRoundRequest(), timeout=120)
    assert r.outcome == "published" and r.version == "v000001", r
    for name in ("objective/kl", "objective/rlhf_reward", "policy/clipfrac", "policy/approxkl", "loss/value_avg",
                 "eval/reward", "eval/kl", "time/rollout_seconds", "time/update_seconds", "time/round_seconds"):
        assert name in r.metrics, name
    assert registry.current() == "v000001"
    r2 = stub.RunRound(pb.RunRoundRequest(), timeout=120)
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    assert r2.outcome == "published" and r2.version == "v000002", r2
    assert registry.manifest(r2.version)["parent"] == "v000001"  # warm-started from the served version
    assert listed.current == r2.version
    assert [p.version for p in listed.policies][0] == "v000001" and listed.policies[0].base_model == "tiny"
    assert stub.ActivatePolicy(pb.ActivatePolicyRequest(version="v000001"), timeout=10).version == "v000001"
    assert registry.current() == "v000001"
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.rounds_total == 2 and status.current == "v000001" and not status.round_in_progress
    try:
        stub.ActivatePolicy(pb.ActivatePolicyRequest(version="v000099"), timeout=10)
        raise AssertionError("unknown version accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_too_few_prompts_skips(trainer):
    stub, registry = trainer(prompts=2)
    r = stub.RunRound(pb.RunRoundRequest(), timeout=60)
    assert r.outcome == "skipped" and "min_prompts" in r.reason and registry.versions() == []


def test_the_gate_rejects_a_candidate_over_the_kl_budget(trainer):
    stub, registry = trainer(kl_budget=1e-9, learning_rate=1e-2)
    r = stub.RunRound(pb.RunRoundRequest(), timeout=120)
    assert r.outcome == "rejected" and "over budget" in r.reason
    assert registry.versions() == [] and registry.current() == ""


def test_gate_rules():
    def ev(rewards, kl=1.0):
        return {"rewards": rewards, "eval/reward": sum(rewards) / len(rewards), "eval/kl": kl}

    cur = ev([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    assert gate(ev([0.5, 0.1, 0.9, 0.3, 0.7, 0.2]), cur, kl_budget=5)[0]  # unchanged: published
    assert gate(ev([0.6, 0.0, 0.9, 0.4, 0.6, 0.2]), cur, kl_budget=5)[0]  # noise either way: published
    ok, reason = gate(ev([0.1, -0.3, 0.5, -0.1, 0.3, -0.2]), cur, kl_budget=5)  # every sample worse
    assert not ok and "dropped" in reason
    assert "over budget" in gate(ev([0.5] * 6, kl=9.0), cur, kl_budget=5)[1]
    # the KL's standard error is said beside it, in a refusal and in a pass, when the evaluation has one
    assert "KL to reference 9.00 ± 1.20 over budget 5.00" in gate({**ev([0.5] * 6, kl=9.0), "eval/kl_se": 1.2}, cur,
                                                                   kl_budget=5)[1]
    assert gate({**ev([0.5] * 6, kl=4.0), "eval/kl_se": 0.8}, cur, kl_budget=5)[1].endswith("KL 4.00 ± 0.80")
    assert "non-finite" in gate(ev([float("nan")] + [0.5] * 5), cur, kl_budget=5)[1]


def test_admin_rpcs_need_the_token(trainer):
    stub, _ = trainer(admin_token="t0k")
    for call in (lambda: stub.RunRound(pb.RunRoundRequest(), timeout=10),
                 lambda: stub.ActivatePolicy(pb.ActivatePolicyRequest(version=""), timeout=10)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).rounds_total == 0


def test_with_canaries_a_round_publishes_a_canary_and_the_next_trains_on_top_of_it(trainer):
    stub, registry = trainer(reward=flat_reward, canary=True)
    first = stub.RunRound(pb.RunRoundRequest(), timeout=120)
    assert first.outcome == "published" and registry.canary() == first.version and registry.current() == ""
    listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert (listed.current, listed.canary, status.current, status.canary) == ("", first.version, "", first.version)
    second = stub.RunRound(pb.RunRoundRequest(), timeout=120)  # no verdict on the canary yet: training goes on
    assert second.outcome == "published" and registry.manifest(second.version)["parent"] == first.version
    assert registry.decision(second.version)["outcome"] == "queued" and registry.canary() == first.version
    assert "eval/reward_diff_se" in second.metrics  # what the controller's reward-hacking guard reads
    stub.ActivatePolicy(pb.ActivatePolicyRequest(version=first.version), timeout=10)  # an operator promotes it
    assert registry.current() == first.version and registry.canary() == second.version
    assert registry.decision(first.version)["by"] == "operator"
