"""The committed generated code is exactly what grpcio-tools makes from protos/ (never edited by hand)."""

from __future__ import annotations

import filecmp
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos(tmp_path):
    protos = sorted((REPO / "protos").rglob("*.proto"))
    rel = [str(p.relative_to(REPO / "protos")) for p in protos]
    rc = protoc.main(["protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", *rel])
    assert rc == 0
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "protoc produced nothing"
    stale = [str(f) for f in fresh if not filecmp.cmp(tmp_path / f, REPO / f, shallow=False)]
    assert not stale, f"regenerate with `make protos`: {stale}"


def test_contract_names():
    from rlhf_online.v1 import generation_pb2, reward_pb2, trainer_pb2

    services = {
        generation_pb2: ("Generation", {"Generate", "GenerateStream", "SubmitFeedback", "SubmitPreference", "SubmitRanking",
                                     "GetPolicy"}),
        reward_pb2: ("Reward", {"Score", "Train", "GetRewardModel"}),
        trainer_pb2: ("Trainer", {"GetStatus", "RunRound", "ListPolicies", "ActivatePolicy"}),
    }
    for module, (name, methods) in services.items():
        svc = module.DESCRIPTOR.services_by_name[name]
        assert svc.full_name == f"rlhf_online.v1.{name}"
        assert {m.name for m in svc.methods} == methods
    assert trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].methods_by_name["ActivatePolicy"].output_type.full_name \
        == "rlhf_online.v1.Policy"
