"""The shared versioned registry: version names, numbering, never overwriting, errors, pointers, old layouts."""

from __future__ import annotations

import json
import threading
import time

import pytest

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.artifacts import file_hashes, publish_dir
from rlhf_online.config import RewardSettings
from rlhf_online.errors import ConfigError, InvalidArgument, NotFound
from rlhf_online.registry import is_version
from rlhf_online.reward.registry import RewardRegistry


def write_files(**files: str):
    """A `write(dir)` that creates the given text files."""
    def write(d):
        for name, text in files.items():
            (d / name).write_text(text)
    return write


@pytest.mark.parametrize("name,prefix,ok", [
    ("v000001", "v", True), ("r123456", "r", True),
    ("r000001", "v", False), ("v000001\n", "v", False), ("v1", "v", False), ("v0000001", "v", False),
    ("v\u0660\u0660\u0660\u0660\u0660\u0661", "v", False), ("", "v", False), ("../v000001", "v", False),
    ("v000001/", "v", False), ("V000001", "v", False),
])
def test_one_version_pattern(name, prefix, ok):
    assert is_version(name, prefix) is ok


@pytest.mark.parametrize("pin", ["r000001\n", "r\u0660\u0660\u0660\u0660\u0660\u0661", "v000001", "r1"])
def test_pinned_reward_versions_use_the_same_pattern(pin, tmp_path):
    with pytest.raises(ConfigError, match="pin_version"):
        RewardSettings(data_dir=tmp_path, pin_version=pin)
    assert RewardSettings(data_dir=tmp_path, pin_version="r000003").pin_version == "r000003"


@pytest.mark.parametrize("cls,first", [(AdapterRegistry, "v000001"), (RewardRegistry, "r000001")])
def test_both_registries_answer_malformed_and_absent_versions_alike(cls, first, tmp_path):
    registry = cls(tmp_path / "reg")
    assert registry.publish(write_files(a="1"), base_model="tiny") == first  # a manifest field of either
    assert registry.manifest(first)["version"] == first
    for bad in ("../x", first + "\n", first[0] + "1", "CURRENT"):
        with pytest.raises(InvalidArgument, match="^version:"):
            registry.path(bad)
        with pytest.raises(InvalidArgument):
            registry.activate(bad)
    absent = first[0] + "000042"
    with pytest.raises(NotFound, match=absent):
        registry.manifest(absent)
    with pytest.raises(NotFound):
        registry.activate(absent)
    assert registry.current() == ""


def test_numbering_skips_every_name_present_and_never_overwrites(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    (registry.root / "v000003").mkdir()  # left by hand, no manifest: not a version, but its name is taken
    (registry.root / "v000003" / "keep").write_text("mine")
    assert registry.versions() == [] and registry.next_version() == "v000004"
    assert registry.publish(write_files(a="1"), base_model="tiny") == "v000004"
    assert (registry.root / "v000003" / "keep").read_text() == "mine"
    with pytest.raises(FileExistsError):
        publish_dir(registry.root / "v000004", write_files(a="2"), manifest={}, replace=False)
    assert registry.manifest("v000004")["files"] == file_hashes(registry.root / "v000004")
    assert (registry.root / "v000004" / "a").read_text() == "1"


def test_concurrent_publishers_get_distinct_complete_versions(tmp_path):
    root = tmp_path / "adapters"
    names: list[str] = []
    start = threading.Barrier(8)

    def publisher(k: int) -> None:
        registry = AdapterRegistry(root)  # one object each: the lock belongs to the directory
        start.wait()
        names.append(registry.publish(write_files(a=str(k)), base_model="tiny"))

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry = AdapterRegistry(root)
    assert sorted(names) == registry.versions() == [f"v{n:06d}" for n in range(1, 9)]
    assert sorted((root / v / "a").read_text() for v in names) == [str(k) for k in range(8)]
    for v in names:
        registry.manifest(v)  # every one verifies


def test_the_pointer_is_the_version_and_a_newline(tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    v = registry.publish(write_files(a="1"))
    registry.activate(v)
    assert (registry.root / "CURRENT").read_text() == f"{v}\n" and registry.current() == v
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]  # no temp leftovers


def old_version(root, name: str, **manifest) -> None:
    """A version directory as the registries wrote it before they were shared."""
    d = root / name
    d.mkdir(parents=True)
    (d / "head.safetensors").write_bytes(b"\x00weights")
    (d / "head.json").write_text("{}")
    (d / "manifest.json").write_text(json.dumps({"version": name, **manifest, "files": file_hashes(d)}, indent=2))


def test_an_old_reward_registry_still_loads_and_migrates_on_the_next_promotion(tmp_path):
    root = tmp_path / "reward_models"
    old_version(root, "r000001", parent="", created_at=1.0, metrics={"pairwise_accuracy": 0.7}, promoted=True)
    old_version(root, "r000002", parent="r000001", created_at=2.0, metrics={}, promoted=False)
    (root / "CURRENT.json").write_text(json.dumps({"version": "r000001", "promoted_at": time.time()}))
    registry = RewardRegistry(root)
    assert registry.versions() == ["r000001", "r000002"] and registry.current() == "r000001"
    assert registry.manifest("r000001")["metrics"] == {"pairwise_accuracy": 0.7}
    assert registry.next_version() == "r000003"
    v = registry.publish(write_files(a="1"), parent="r000001")
    registry.activate(v)
    assert registry.current() == "r000003" and not (root / "CURRENT.json").exists()
    assert RewardRegistry(root).current() == "r000003"  # a restart reads the new pointer


def test_an_old_adapter_registry_still_loads(tmp_path):
    root = tmp_path / "adapters"
    old_version(root, "v000001", base_model="tiny", parent="", metrics={}, created_at=1.0)
    old_version(root, "v000002", base_model="tiny", parent="v000001", metrics={"eval/kl": 1.5}, created_at=2.0)
    (root / "CURRENT").write_text("v000002\n")
    registry = AdapterRegistry(root)
    assert registry.current() == "v000002" and registry.versions() == ["v000001", "v000002"]
    assert registry.manifest("v000002")["metrics"] == {"eval/kl": 1.5}
    assert [m["version"] for m in registry.describe()] == ["v000001", "v000002"]
    assert registry.rollback() == "v000001" and (root / "CURRENT").read_text() == "v000001\n"
