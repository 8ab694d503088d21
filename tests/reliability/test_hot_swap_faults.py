"""Hot-swap faults under load: a bad adapter made CURRENT is refused, the old version keeps serving, the failure
shows in metrics, and a rollback takes effect within one poll interval.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request

import grpc
import pytest

from rlhf_online.v1 import generation_pb2 as pb

POLL = 0.25  # seconds between the replica's looks at CURRENT


def point_current_at(registry, version: str) -> None:
    """Replace CURRENT without the registry's checks, atomically (a plain write_text could be read half done)."""
    tmp = registry.root / ".CURRENT.by-hand"
    tmp.write_text(version + "\n")
    os.replace(tmp, registry.root / "CURRENT")


def flip_byte(d):
    weights = d / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))


def truncate(d):
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 3])


def config_value(key, value):
    """A writer tweak: one adapter_config.json value of the wrong type (hashes still match: it is published so)."""

    def tweak(d):
        config = json.loads((d / "adapter_config.json").read_text())
        config[key] = value
        (d / "adapter_config.json").write_text(json.dumps(config))

    return tweak


# name -> (source adapter, base_model in the manifest, damage after publishing, tweak before hashing)
FAULTS = {
    "flipped byte": ("good2", "tiny", flip_byte, None),
    "truncated weights": ("good2", "tiny", truncate, None),
    "missing weights": ("good2", "tiny", lambda d: (d / "adapter_model.safetensors").unlink(), None),
    "garbage manifest": ("good2", "tiny", lambda d: (d / "manifest.json").write_text("{not json"), None),
    "other base model": ("good2", "some-other-model", None, None),
    "wrong shapes": ("other_shapes", "tiny", None, None),
    "rank given as text": ("good2", "tiny", None, config_value("r", "8")),
    "alpha given as text": ("good2", "tiny", None, config_value("lora_alpha", "32")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_adapter_under_load(fault, generation, kit, lora_dirs, tmp_path):
    from rlhf_online.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(tmp_path / "adapters")
    g = generation(step_delay=0.003, adapter_dir=registry.root, adapter_poll_seconds=POLL)
    stub = g.stub

    def serving() -> str:
        return stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version

    v1 = registry.publish(kit.copy_into(lora_dirs["good0"]), base_model="tiny")
    v2 = registry.publish(kit.copy_into(lora_dirs["good1"]), base_model="tiny", parent=v1)
    for v in (v1, v2):
        registry.activate(v)
        kit.wait_for(lambda v=v: serving() == v, 10, f"the replica to serve {v}")

    stop, served, errors = threading.Event(), [], []

    def client(i: int) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = stub.Generate(pb.GenerateRequest(prompt=f"hello {i}", params=pb.SamplingParams(
                    max_new_tokens=8, temperature=1.0)), timeout=30)
                served.append((t0, r.policy_version))
            except grpc.RpcError as e:
                errors.append((e.code(), e.details()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        source, base_model, damage, tweak = FAULTS[fault]

        def write(d):
            kit.copy_into(lora_dirs[source])(d)
            if tweak:
                tweak(d)

        failed = kit.sample("rlhf_adapter_swaps_total", outcome="failed")
        bad = registry.publish(write, base_model=base_model, parent=v2)
        if damage:
            damage(registry.root / bad)
            # activate() verifies hashes and would refuse: CURRENT is pointed at it behind the registry's back.
            point_current_at(registry, bad)
        else:
            registry.activate(bad)  # intact files, so the registry takes it: the replica's checks must refuse it
        t_bad = time.monotonic()
        kit.wait_for(lambda: kit.sample("rlhf_adapter_swaps_total", outcome="failed") == failed + 1, 10,
                     f"the replica to refuse the {fault} adapter")
        polls = g.watcher.polls
        kit.wait_for(lambda: g.watcher.polls >= polls + 3, 30, "three more polls")  # refused once, not retried
        assert kit.sample("rlhf_adapter_swaps_total", outcome="failed") == failed + 1
        assert serving() == v2 and bad not in g.engine.loaded_versions()
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{g.running.metrics_port}/metrics",
                                              timeout=5).read().decode()
        assert f'rlhf_adapter_swaps_total{{outcome="failed"}} {failed + 1}' in metrics_text

        # Roll back to the older good version: the replica switches on the first poll that starts after the
        # activation (counted in polls, not seconds, so a loaded machine cannot make it flaky).
        t_rollback = time.monotonic()
        polls = g.watcher.polls
        registry.activate(v1)
        kit.wait_for(lambda: serving() == v1, 30, "the rollback")
        assert g.watcher.switched_on_poll <= polls + 1, (g.watcher.switched_on_poll, polls)
        # And the replica still swaps normally afterwards: nothing of a half-loaded bad adapter lingers
        # (PEFT would make leftovers the active adapter when the one serving now is unloaded).
        v4 = registry.publish(kit.copy_into(lora_dirs["good2"]), base_model="tiny", parent=v1)
        for v in (v4, v2):
            registry.activate(v)
            kit.wait_for(lambda v=v: serving() == v, 30, f"the replica to serve {v}")
            kit.wait_for(lambda v=v: any(x == v for _, x in list(served)), 30, f"a reply from {v}")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert len(served) > 10
    assert all(v in (v1, v2, v4) for _, v in served), {v for _, v in served}
    assert all(v == v2 for t0, v in served if t_bad <= t0 < t_rollback)
    r = stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=4)), timeout=30)
    assert r.policy_version == v2 and sorted(g.engine.loaded_versions()) == [v2]


def test_current_naming_a_deleted_version_is_refused(generation, kit, lora_dirs, tmp_path):
    """CURRENT names a version that disappears (deleted by hand): refused, the old one keeps serving."""
    from rlhf_online.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(tmp_path / "adapters")
    g = generation(adapter_dir=registry.root, adapter_poll_seconds=POLL)
    v1 = registry.publish(kit.copy_into(lora_dirs["good0"]), base_model="tiny")
    v2 = registry.publish(kit.copy_into(lora_dirs["good1"]), base_model="tiny")
    registry.activate(v1)
    kit.wait_for(lambda: g.stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version == v1, 10, "v1")
    failed = kit.sample("rlhf_adapter_swaps_total", outcome="failed")
    shutil.rmtree(registry.root / v2)
    point_current_at(registry, v2)
    kit.wait_for(lambda: kit.sample("rlhf_adapter_swaps_total", outcome="failed") == failed + 1, 10, "the refusal")
    r = g.stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=4)), timeout=30)
    assert r.policy_version == v1
