"""The adapter registry: atomic versions with manifests, CURRENT, activate, rollback, prune."""

from __future__ import annotations

import pytest

from rlhf_online.errors import InvalidArgument, NotFound


def test_publish_writes_complete_versions_with_manifests(registry, publish):
    v1 = publish(0)
    v2 = publish(1, parent=v1)
    assert (v1, v2) == ("v000001", "v000002") and registry.versions() == [v1, v2]
    m = registry.manifest(v2)
    assert m["parent"] == v1 and m["base_model"] == "tiny" and m["metrics"] == {"objective/rlhf_reward": 1.0}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(m["files"])
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert registry.current() == ""  # publishing does not activate


def test_a_failed_publish_leaves_nothing_visible(registry):
    def half_written(d):
        (d / "adapter_config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        registry.publish(half_written, base_model="tiny")
    assert registry.versions() == [] and list(registry.root.iterdir()) == []


def test_activate_rollback_prune(registry, publish):
    v1, v2, v3 = publish(0), publish(1), publish(2)
    registry.activate(v3)
    assert registry.current() == v3
    assert registry.rollback() == v2 and registry.current() == v2
    assert registry.rollback() == v1
    assert registry.rollback() == "" and registry.current() == ""  # back to the bare base
    registry.activate(v1)
    assert registry.prune(keep=1) == [v2]  # v3 is newest, v1 is current: both kept
    assert registry.versions() == [v1, v3]


def test_activate_refuses_unknown_malformed_and_corrupt(registry, publish):
    v1 = publish(0)
    with pytest.raises(NotFound):
        registry.activate("v000009")
    with pytest.raises(InvalidArgument):
        registry.activate("../etc")
    weights = registry.path(v1) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match="corrupt"):
        registry.activate(v1)
    assert registry.current() == ""


def test_policies_cli(registry, publish):
    import subprocess
    import sys

    v1, v2 = publish(0), publish(1)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "policies", *args,
                               "--adapter-dir", str(registry.root)], capture_output=True, text=True, timeout=60)

    assert cli("activate", v2).returncode == 0 and registry.current() == v2
    out = cli("list").stdout
    assert f"* {v2}" in out and f"  {v1}" in out and "CURRENT = v000002" in out
    assert "CURRENT = v000001" in cli("rollback").stdout and registry.current() == v1
    bad = cli("activate", "v000042")
    assert bad.returncode == 1 and "not found" in bad.stderr
    registry.set_canary(v2)
    registry.record(v2, {"outcome": "live"})
    out = cli("list").stdout
    assert f"~ {v2}" in out and "canary=live" in out and "CANARY = v000002" in out
    assert "CURRENT = v000002 (promoted from CANARY)" in cli("promote").stdout and registry.canary() == ""
    nothing = cli("promote")
    assert nothing.returncode == 1 and "no canary to promote" in nothing.stderr
    registry.set_canary(v1)
    assert "CANARY = (none) (v000001 rolled back)" in cli("rollback").stdout and registry.current() == v2


def test_canary_pointer_promote_and_rollback(registry, publish):
    v1, v2, v3 = publish(0), publish(1, parent="v000001"), publish(2, parent="v000002")
    registry.activate(v1)
    assert registry.canary() == ""
    registry.set_canary(v2)
    assert (registry.current(), registry.canary()) == (v1, v2)
    assert (registry.root / "CANARY").read_text() == "v000002\n"
    with pytest.raises(InvalidArgument, match="already CURRENT"):
        registry.set_canary(v1)
    assert registry.promote() == v2 and (registry.current(), registry.canary()) == (v2, "")
    with pytest.raises(InvalidArgument, match="no canary"):
        registry.promote()
    registry.set_canary(v3)
    assert registry.rollback() == v2 and (registry.current(), registry.canary()) == (v2, "")  # the canary goes first
    assert registry.rollback() == v1 and registry.current() == v1  # then CURRENT, as before canaries
    # A version promoted from a canary rolls back to the stable one it was promoted over, not to a
    # newer version older than it that users may have rejected.
    v4 = publish(0, parent=v1)
    registry.set_canary(v4)
    registry.promote()
    registry.record(v4, {"outcome": "promoted", "stable": v1})
    assert registry.rollback() == v1 and registry.current() == v1


def test_prune_keeps_current_and_canary(registry, publish):
    v1, v2, v3, v4 = publish(0), publish(1), publish(2), publish(0)
    registry.activate(v1)
    registry.set_canary(v2)
    assert registry.prune(keep=1) == [v3]
    assert registry.versions() == [v1, v2, v4]


def test_records_and_lineage(registry, publish):
    v1 = publish(0)
    v2 = publish(1, parent=v1)
    v3 = publish(2, parent=v2)
    other = publish(0)
    assert registry.lineage(v3, v1) == [v2, v3] and registry.lineage(v3, "") == [v1, v2, v3]
    assert registry.lineage(v1, v1) == [] and registry.lineage(other, v1) is None
    assert registry.decision(v2) is None and registry.decisions() == []
    registry.record(v2, {"outcome": "queued", "queued_at": 1.0})
    registry.record(v3, {"outcome": "queued"})
    assert registry.record(v2, {"outcome": "live"}) == {"version": v2, "outcome": "live", "queued_at": 1.0}
    assert registry.with_outcome("queued") == [v3] and [r["version"] for r in registry.decisions()] == [v2, v3]
    with pytest.raises(NotFound):
        registry.record("v000099", {"outcome": "queued"})
