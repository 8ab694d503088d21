"""Security: admin RPCs need the bearer token, every server speaks TLS, and no RPC takes a filesystem path."""

from __future__ import annotations

import grpc
import pytest

from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import reward_pb2 as rw
from rlhf_online.v1 import trainer_pb2 as tr

TOKEN = "s3cr3t-t0ken"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
WRONG = {
    "missing": (),
    "wrong token": (("authorization", "Bearer not-the-token"),),
    "a prefix of the token": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "the token plus more": (("authorization", f"Bearer {TOKEN}x"),),
    "no Bearer scheme": (("authorization", TOKEN),),
    "another header": (("x-api-key", TOKEN),),
    "empty": (("authorization", ""),),
}
RIGHT = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def admin_servers(tiny, tmp_path_factory, kit):
    """A trainer and a reward server that require TOKEN for their admin RPCs."""
    tstub, registry, trunning = kit.start_trainer(tiny, tmp_path_factory.mktemp("trainer"), admin_token=TOKEN)
    rstub, _, rrunning = kit.start_reward(tmp_path_factory.mktemp("reward"), admin_token=TOKEN)
    yield tstub, registry, rstub
    trunning.shutdown(1)
    rrunning.shutdown(1)


def admin_calls(tstub, rstub):
    return {
        "Trainer.RunRound": lambda md: tstub.RunRound(tr.RunRoundRequest(), timeout=60, metadata=md),
        "Trainer.ActivatePolicy": lambda md: tstub.ActivatePolicy(tr.ActivatePolicyRequest(version=""), timeout=10,
                                                                  metadata=md),
        "Reward.Train": lambda md: rstub.Train(rw.TrainRewardRequest(), timeout=30, metadata=md),
    }


@pytest.mark.parametrize("method", ["Trainer.RunRound", "Trainer.ActivatePolicy", "Reward.Train"])
def test_admin_rpcs_need_the_token(admin_servers, kit, method):
    tstub, registry, rstub = admin_servers
    call = admin_calls(tstub, rstub)[method]
    service, name = method.split(".")
    denied = kit.rpcs(service, name, "UNAUTHENTICATED")
    for what, metadata in WRONG.items():
        got, details = kit.code(lambda metadata=metadata: call(metadata))
        assert got == UNAUTHENTICATED, (what, got, details)
        assert "bearer token" in details and TOKEN not in details
    assert kit.rpcs(service, name, "UNAUTHENTICATED") == denied + len(WRONG)  # refusals show in metrics
    assert kit.code(lambda: call(RIGHT))[0] == grpc.StatusCode.OK


def test_other_rpcs_need_no_token(admin_servers):
    tstub, _, rstub = admin_servers
    # Read-only trainer RPCs answer without a token and report the trainer's real state: a round run
    # with the token shows up in the next tokenless GetStatus.
    before = tstub.GetStatus(tr.GetStatusRequest(), timeout=10)
    result = tstub.RunRound(tr.RunRoundRequest(), timeout=60, metadata=RIGHT)
    after = tstub.GetStatus(tr.GetStatusRequest(), timeout=10)
    assert after.rounds_total == before.rounds_total + 1
    assert after.last_round.outcome == result.outcome and not after.round_in_progress
    assert tstub.ListPolicies(tr.ListPoliciesRequest(), timeout=10).current == after.current
    assert len(rstub.Score(rw.ScoreRequest(items=[rw.ScoreItem(prompt="p", completion="c")]), timeout=10).scores) == 1
    assert rstub.GetRewardModel(rw.GetRewardModelRequest(), timeout=10).version == "sentiment"


def test_the_token_is_compared_in_constant_time(admin_servers, monkeypatch):
    import hmac

    import services.interceptors as interceptors

    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(interceptors.hmac, "compare_digest", spy)
    tstub, _, _ = admin_servers
    with pytest.raises(grpc.RpcError):
        tstub.ActivatePolicy(tr.ActivatePolicyRequest(version=""), timeout=10, metadata=WRONG["wrong token"])
    assert calls and calls[-1][1] == f"Bearer {TOKEN}".encode()


# ------------------------------------------------------------------------------------------------ TLS

def tls_server(service, tiny, root, kit, tls_pair):
    cert, key = tls_pair
    if service == "generation":
        g = kit.start_generation(tiny, root, tls_cert=cert, tls_key=key)

        def good(channel):
            from rlhf_online.v1 import generation_pb2_grpc
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=2)), timeout=10)
            return len(reply.completions) == 1 and reply.completions[0].completion_id != ""

        return g.running, good
    if service == "reward":
        _, _, running = kit.start_reward(root, tls_cert=cert, tls_key=key, admin_token=TOKEN)

        def good(channel):
            from rlhf_online.v1 import reward_pb2_grpc
            stub = reward_pb2_grpc.RewardStub(channel)
            stub.Train(rw.TrainRewardRequest(), timeout=30, metadata=RIGHT)  # a token travels over TLS too
            return len(stub.Score(rw.ScoreRequest(items=[rw.ScoreItem(completion="c")]), timeout=10).scores) == 1

        return running, good
    _, _, running = kit.start_trainer(tiny, root, tls_cert=cert, tls_key=key)

    def good(channel):
        from rlhf_online.v1 import trainer_pb2_grpc
        status = trainer_pb2_grpc.TrainerStub(channel).GetStatus(tr.GetStatusRequest(), timeout=10)
        return status.rounds_total == 0 and status.current == ""  # a fresh trainer's real state

    return running, good


@pytest.mark.parametrize("service", ["generation", "reward", "trainer"])
def test_tls(service, tiny, tmp_path, kit, tls_pair, other_cert):
    running, good = tls_server(service, tiny, tmp_path, kit, tls_pair)
    try:
        cert = tls_pair[0].read_bytes()
        secure = grpc.secure_channel(f"localhost:{running.port}", grpc.ssl_channel_credentials(cert))
        assert good(secure) is True
        # A plaintext client cannot reach the TLS port.
        plain = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        got, details = kit.code(lambda: good(plain))
        assert got == grpc.StatusCode.UNAVAILABLE, (got, details)
        # Nor can a TLS client that does not trust the server's certificate.
        stranger = grpc.secure_channel(f"localhost:{running.port}",
                                       grpc.ssl_channel_credentials(other_cert.read_bytes()))
        assert kit.code(lambda: good(stranger))[0] == grpc.StatusCode.UNAVAILABLE
        assert good(secure) is True  # and the server still serves
    finally:
        running.shutdown(1)


# ------------------------------------------------------------------------------------------------ paths

PATHS = ["../x", "../../../../etc/passwd", "/etc/passwd", "/tmp", "v000001/../../CURRENT", "./v000001",
         "v000001/", "~root", "..", "CURRENT", "file:///etc/passwd"]


@pytest.mark.parametrize("version", PATHS)
def test_activate_policy_takes_a_version_not_a_path(admin_servers, tmp_path_factory, version, kit):
    tstub, registry, _ = admin_servers
    before = sorted(p.name for p in registry.root.parent.iterdir())
    got, details = kit.code(lambda: tstub.ActivatePolicy(tr.ActivatePolicyRequest(version=version), timeout=10,
                                                         metadata=RIGHT))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("version:"), (got, details)
    assert registry.current() == "" and sorted(p.name for p in registry.root.parent.iterdir()) == before


def test_no_request_field_is_a_path():
    """No request message of the three services has a field meant to carry a path, file, directory or URL."""
    from rlhf_online.v1 import generation_pb2, reward_pb2, trainer_pb2

    suspicious = ("path", "file", "dir", "url", "uri", "location")
    seen = 0
    for module in (generation_pb2, reward_pb2, trainer_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                stack = [method.input_type]
                while stack:
                    message = stack.pop()
                    for field in message.fields:
                        seen += 1
                        assert not any(s in field.name.lower() for s in suspicious), f"{message.full_name}.{field.name}"
                        if field.message_type is not None and field.message_type is not message:
                            stack.append(field.message_type)
    assert seen > 10
