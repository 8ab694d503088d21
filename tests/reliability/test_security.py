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


# ------------------------------------------------------------------------------------------------ mutual TLS

SCORE = rw.ScoreRequest(items=[rw.ScoreItem(prompt="p", completion="c")])


def scores(channel) -> int:
    from rlhf_online.v1 import reward_pb2_grpc

    return len(reward_pb2_grpc.RewardStub(channel).Score(SCORE, timeout=10).scores)


def test_a_tls_client_verifies_the_server_against_the_ca(pki, tmp_path, kit):
    from rlhf_online.tls import ClientTLS, channel

    ours, rogue = pki
    _, _, running = kit.start_reward(tmp_path, tls_cert=ours.server_cert, tls_key=ours.server_key)
    try:
        for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
            assert scores(channel(f"{host}:{running.port}", ClientTLS(ours.ca))) == 1
        assert kit.code(lambda: scores(channel(f"127.0.0.1:{running.port}")))[0] == grpc.StatusCode.UNAVAILABLE
        # Another CA's bundle does not vouch for this server; nor does a client certificate make up for that.
        for stranger in (ClientTLS(rogue.ca), ClientTLS(rogue.ca, ours.client_cert, ours.client_key)):
            got, details = kit.code(lambda stranger=stranger: scores(channel(f"localhost:{running.port}", stranger)))
            assert got == grpc.StatusCode.UNAVAILABLE, (got, details)
    finally:
        running.shutdown(1)


def test_mutual_tls_serves_only_clients_with_a_certificate_from_the_client_ca(pki, tmp_path, kit):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rlhf_online.tls import ClientTLS, channel
    from services.reward import SERVICE_NAME
    from services.trainer import reward_readiness

    ours, rogue = pki
    _, _, running = kit.start_reward(tmp_path, tls_cert=ours.server_cert, tls_key=ours.server_key,
                                     tls_client_ca=ours.ca, health_port=0)
    addr = f"localhost:{running.port}"
    try:
        refused = {
            "plaintext": None,
            "TLS, no client certificate": ClientTLS(ours.ca),
            "a certificate from another CA": ClientTLS(ours.ca, rogue.client_cert, rogue.client_key),
        }
        for what, client in refused.items():
            got, details = kit.code(lambda client=client: scores(channel(addr, client)))
            assert got == grpc.StatusCode.UNAVAILABLE, (what, got, details)
            # The trainer's readiness check, configured like that, finds the service unreachable.
            assert "unreachable" in reward_readiness(addr, timeout=2, tls=client)(), what
        good = ClientTLS(ours.ca, ours.client_cert, ours.client_key)
        assert scores(channel(addr, good)) == 1
        assert reward_readiness(addr, timeout=10, tls=good)() == ""
        # Probes that cannot speak TLS use the plaintext health port: the same health servicer, nothing else.
        plain = grpc.insecure_channel(f"127.0.0.1:{running.health_port}")
        health = health_pb2_grpc.HealthStub(plain)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        running.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert kit.code(lambda: scores(plain))[0] == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.shutdown(1)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_trainer_runs_a_round_against_a_reward_service_over_tls(pki, tiny, tmp_path, kit, mutual):
    from rlhf_online import config
    from services.trainer import reward_of

    ours, _ = pki
    _, _, reward = kit.start_reward(tmp_path / "reward", tls_cert=ours.server_cert, tls_key=ours.server_key,
                                    **({"tls_client_ca": ours.ca} if mutual else {}))
    # The trainer's reward calls as its settings configure them, from the environment as Kubernetes sets it.
    env = {"RLHF_REWARD_ADDR": f"localhost:{reward.port}", "RLHF_TLS_CA": str(ours.ca)}
    if mutual:
        env.update(RLHF_TLS_CLIENT_CERT=str(ours.client_cert), RLHF_TLS_CLIENT_KEY=str(ours.client_key))
    score, not_ready = reward_of(config.build(config.TrainerSettings, None, env))
    assert not_ready() == ""  # reachable, and scoring with the built-in reward
    stub, registry, running = kit.start_trainer(tiny, tmp_path / "trainer", prompts=8, reward=score,
                                                reward_not_ready=not_ready)
    scored = kit.rpcs("Reward", "Score", "OK")
    try:
        r = stub.RunRound(tr.RunRoundRequest(), timeout=300)
        assert r.outcome in ("published", "rejected") and "round failed" not in r.reason, r
        assert "eval/kl" in r.metrics and kit.rpcs("Reward", "Score", "OK") > scored  # a whole round, scored over TLS
    finally:
        running.shutdown(1)
        reward.shutdown(1)
