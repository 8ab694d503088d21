"""Hot-swap in a generation replica: under load, with corrupt adapters, and through GetPolicy."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY
from support import wait_for

from rlhf_online.adapters.watcher import AdapterWatcher
from rlhf_online.artifacts import write_atomically
from rlhf_online.canary.routing import CanaryRouter
from rlhf_online.config import GenerationSettings
from rlhf_online.store import open_store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.bootstrap import engine_config
from services.generation import start_generation_server


def swaps(outcome: str) -> float:
    return REGISTRY.get_sample_value("rlhf_adapter_swaps_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def replica(make_engine, tmp_path, registry):
    """A generation server on the tiny model watching `registry` every 50 ms."""
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path, base_model="tiny",
                                  store_url=f"sqlite:///{tmp_path / 'store.db'}", adapter_dir=registry.root,
                                  adapter_poll_seconds=0.05, canary_percent=50.0)
    cfg = engine_config(settings)
    engine = make_engine(step_delay=0.005, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue)
    switches: list[tuple[float, str]] = [(0.0, "")]
    set_current = engine.set_current

    def recording_set_current(version: str) -> None:
        set_current(version)
        switches.append((time.monotonic(), version))

    engine.set_current = recording_set_current
    running = start_generation_server(settings, engine, open_store(settings.store_url))
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    yield stub, engine, switches
    running.shutdown(2)


def wait_serving(stub, version: str, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version != version:
        assert time.time() < end, f"replica never switched to {version!r}"
        time.sleep(0.02)


def test_swaps_under_load_drop_nothing_and_pin_each_request(replica, registry, publish):
    stub, engine, switches = replica
    versions = [publish(0), publish(1), publish(2)]
    stop, errors, served = threading.Event(), [], []

    def client(i: int) -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                r = stub.Generate(pb.GenerateRequest(prompt=f"hello {i}", params=pb.SamplingParams(
                    max_new_tokens=12, temperature=1.0)), timeout=30)
                served.append((start, r.policy_version))
            except grpc.RpcError as e:
                errors.append(e.code())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    order = [versions[0], versions[1], "", versions[2], versions[0], versions[2]]  # 6 changes, incl. rollback
    for v in order:
        registry.activate(v)
        wait_serving(stub, v)
        switched = time.monotonic()
        end = time.time() + 60
        while not any(t >= switched and got == v for t, got in list(served)):  # requests really ran on it
            assert time.time() < end, f"no request started after the switch was served by {v!r}"
            time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(served) >= len(order)
    for start, version in served:
        # the version the replica served when this request started, or one it switched to later
        at_start = [v for t, v in switches if t <= start][-1]
        allowed = {at_start} | {v for t, v in switches if t > start}
        assert version in allowed, (version, allowed)
    assert {v for _, v in served} >= {versions[0], versions[1], versions[2], ""}
    assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version == versions[2]
    end = time.time() + 30
    while engine.loaded_versions() != [versions[2]]:  # the old ones are unloaded once nothing uses them
        assert time.time() < end, engine.loaded_versions()
        time.sleep(0.02)


def test_canary_on_off_and_promoted_under_load_drops_nothing_and_keeps_outsiders_off_it(replica, registry, publish):
    stub, engine, _ = replica
    stable, first, second = publish(0), publish(1), publish(2)
    registry.activate(stable)
    wait_serving(stub, stable)
    router = CanaryRouter(50.0)
    users = [f"user-{i}" for i in range(6)]
    inside = {u for u in users if router.in_canary(u)}
    assert 0 < len(inside) < len(users)
    stop, promoted, errors, served = threading.Event(), threading.Event(), [], []

    def client(user: str) -> None:
        while not stop.is_set():
            after_promotion = promoted.is_set()  # set once the replica serves the promoted version as stable
            try:
                r = stub.Generate(pb.GenerateRequest(prompt=f"hello {user}", n=2, user_id=user, params=pb.SamplingParams(
                    max_new_tokens=12, temperature=1.0)), timeout=30)
                served.append((user, r.policy_version, [c.policy_version for c in r.completions], after_promotion))
            except grpc.RpcError as e:
                errors.append(e.code())

    def canary_served(version: str) -> None:
        wait_for(lambda: engine.canary_version == version, 20, f"replica canary {version!r}")
        seen = len(served)
        wait_for(lambda: any(version in got for _, _, got, _ in served[seen:]), 60, f"a reply of canary {version!r}")

    threads = [threading.Thread(target=client, args=(u,)) for u in users]
    for t in threads:
        t.start()
    registry.set_canary(first)
    canary_served(first)
    registry.set_canary("")  # rolled back
    wait_for(lambda: engine.canary_version == "", 20, "the canary dropped")
    registry.set_canary(second)
    canary_served(second)
    registry.promote()
    wait_serving(stub, second)
    wait_for(lambda: engine.canary_version == "", 20, "the promoted canary cleared")
    promoted.set()
    wait_for(lambda: sum(after for *_, after in served) > len(users), 60, "requests after the promotion")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    for user, version, got, _ in served:
        if user not in inside:
            assert set(got) <= {stable, second} and first not in got, (user, got)  # never a canary's reply
            assert len(set(got)) == 1
        elif len(set(got)) == 2:  # interleaved: one candidate of each side, the response names the canary
            assert version in got and version in (first, second)
    assert any(len(set(got)) == 2 for _, _, got, _ in served)
    # Submitted after the promotion: everyone, both candidates, on the promoted version.
    assert all(set(got) == {second} for _, _, got, after in served if after)
    wait_for(lambda: engine.loaded_versions() == [second], 30, "the old versions unloaded")


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "wrong base model"])
def test_a_bad_adapter_is_never_served(replica, registry, publish, damage):
    stub, engine, _ = replica
    good = publish(0)
    registry.activate(good)
    wait_serving(stub, good)
    failed = swaps("failed")
    bad = publish(1, base_model="some-other-model") if damage == "wrong base model" else publish(1)
    weights = registry.path(bad) / "adapter_model.safetensors"
    if damage == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    # CURRENT is pointed at it behind the registry's back (activate() itself refuses corrupt versions).
    # Replaced in one step, as an operator's tool would: a plain write_text could be read half-written
    # (empty), which names the bare base and would make the test flaky.
    write_atomically(registry.root / "CURRENT", lambda tmp: tmp.write_text(bad + "\n"))
    end = time.time() + 30
    while swaps("failed") == failed:
        assert time.time() < end, "the bad adapter was not refused"
        time.sleep(0.02)
    assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version == good
    r = stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=4)), timeout=30)
    assert r.policy_version == good and bad not in engine.loaded_versions()


def test_shape_mismatch_is_refused_before_touching_the_model(make_engine, registry, lora_models, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    wrong = get_peft_model(other, LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    v = registry.publish(wrong.save_pretrained, base_model="tiny")
    engine = make_engine()
    before = copy.deepcopy(engine.model.state_dict())
    watcher = AdapterWatcher(registry, engine, base_model="tiny", poll_seconds=1)
    registry.activate(v)
    assert watcher.check() == ""  # refused, still the bare base
    assert v in watcher.refused and engine.loaded_versions() == []
    assert all((engine.model.state_dict()[k] == t).all() for k, t in before.items())


def test_a_replaced_pointer_is_noticed_between_polls(make_engine, registry, publish):
    """A new CURRENT or CANARY is checked as soon as a stat sees its file replaced, not at the next poll (an hour)."""
    engine = make_engine()
    first, second = publish(0), publish(1)
    watcher = AdapterWatcher(registry, engine, base_model="tiny", poll_seconds=3600, notice_seconds=0.01).start()
    try:
        wait_for(lambda: watcher.polls == 1, 30, "the first check")
        registry.activate(first)
        wait_for(lambda: engine.policy_version == first, 30, "the switch to the new CURRENT")
        registry.set_canary(second)
        wait_for(lambda: engine.canary_version == second, 30, "the switch to the new CANARY")
        assert watcher.polls == 3  # one check per replaced pointer, none from the hourly poll
    finally:
        watcher.stop()
