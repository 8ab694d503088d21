"""Every RPC of the three services against malformed requests: the right status code, a message naming the field,
and the server still serving a good request afterwards.

One server per service for the whole table (module scope); each case is followed by a good request.
"""

from __future__ import annotations

import grpc
import pytest

from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import reward_pb2 as rw
from rlhf_online.v1 import trainer_pb2 as tr

INVALID, NOT_FOUND, TOO_BIG, OK = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK)
OVER_GRPC_LIMIT = 5 * 1024 * 1024  # the servers accept messages up to 4 MiB
P = pb.SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def gen(tiny, tmp_path_factory, kit):
    g = kit.start_generation(tiny, tmp_path_factory.mktemp("gen"))
    r = g.stub.Generate(pb.GenerateRequest(prompt="Say hi.", n=2, params=P), timeout=30)
    g.ids = [c.completion_id for c in r.completions]  # real completions for the feedback cases
    g.other = g.stub.Generate(pb.GenerateRequest(prompt="Say bye.", params=P), timeout=30).completions[0].completion_id
    yield g
    g.running.shutdown(1)


@pytest.fixture(scope="module")
def reward(tmp_path_factory, kit):
    stub, runtime, running = kit.start_reward(tmp_path_factory.mktemp("reward"))
    yield stub, running
    running.shutdown(1)


@pytest.fixture(scope="module")
def trainer(tiny, tmp_path_factory, kit, lora_dirs):
    stub, registry, running = kit.start_trainer(tiny, tmp_path_factory.mktemp("trainer"))
    good = registry.publish(kit.copy_into(lora_dirs["good0"]), base_model="tiny")
    corrupt = registry.publish(kit.copy_into(lora_dirs["good1"]), base_model="tiny")
    weights = registry.path(corrupt) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated after publishing
    registry.activate(good)
    yield stub, registry, running
    running.shutdown(1)


def raw(channel: grpc.Channel, method: str):
    """A call sending bytes as they are, for requests no well-behaved client library would produce."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def utf8_broken(message, marker: str) -> bytes:
    """The serialized message with `marker` (inside one string field) replaced by invalid UTF-8 bytes."""
    data = message.SerializeToString()
    assert marker.encode() in data
    return data.replace(marker.encode(), b"\xff\xfe" + b"\x00" * (len(marker) - 2))


def _check(call, want: grpc.StatusCode, field: str, kit, sent: str = "") -> None:
    got, details = kit.code(call)
    assert got == want, f"got {got.name}: {details!r}"
    if want != OK:
        assert field in details, f"the message does not name {field!r}: {details!r}"
    # Whatever the case, the message shows nothing of the server's insides (`sent`: the request's own text).
    assert not kit.leaks(details, sent), f"the message shows {kit.leaks(details, sent)}: {details!r}"


# ------------------------------------------------------------------------------------------------ Generation

def many_messages(n: int, content: str = "hello there") -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=content) for i in range(n)]


GENERATE_CASES = [
    ("empty prompt", pb.GenerateRequest(prompt="", params=P), INVALID, "prompt"),
    ("blank prompt", pb.GenerateRequest(prompt=" \n\t ", params=P), INVALID, "prompt"),
    ("neither prompt nor messages", pb.GenerateRequest(params=P), INVALID, "prompt"),
    ("both prompt and messages", pb.GenerateRequest(prompt="x", messages=many_messages(1)), INVALID, "prompt"),
    ("huge prompt (1 MB)", pb.GenerateRequest(prompt="a" * 1_000_000, params=P), INVALID, "prompt"),
    ("prompt over the token limit", pb.GenerateRequest(prompt="word " * 3000, params=P), INVALID, "prompt"),
    ("over-long chat history", pb.GenerateRequest(messages=many_messages(2000), params=P), INVALID, "messages"),
    ("huge chat history (100k turns)", pb.GenerateRequest(messages=many_messages(100_000, "x"), params=P),
     INVALID, "messages"),
    ("empty turn in a history", pb.GenerateRequest(messages=[*many_messages(3), pb.ChatMessage(role="user")]),
     INVALID, "messages[3].content"),
    ("unknown role", pb.GenerateRequest(messages=[pb.ChatMessage(role="root", content="hi")]), INVALID,
     "messages[0].role"),
    ("huge unknown role (echoed back, clipped)", pb.GenerateRequest(messages=[pb.ChatMessage(role="r" * 100_000,
                                                                                         content="hi")]),
     INVALID, "messages[0].role"),
    ("max_new_tokens too large", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(max_new_tokens=100_000)),
     INVALID, "params.max_new_tokens"),
    ("negative temperature", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=-1)), INVALID,
     "params.temperature"),
    ("NaN temperature", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=float("nan"))),
     INVALID, "params.temperature"),
    ("infinite temperature", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=float("inf"))),
     INVALID, "params.temperature"),
    ("top_p above 1", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=1.5)), INVALID,
     "params.top_p"),
    ("negative top_p", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=-0.5)), INVALID,
     "params.top_p"),
    ("NaN top_p", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=float("nan"))), INVALID,
     "params.top_p"),
    ("seed past 2^63", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(seed=2**64 - 1)), INVALID,
     "params.seed"),
    ("too many stop strings", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(stop=["a"] * 9)), INVALID,
     "params.stop"),
    ("empty stop string", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(stop=[""])), INVALID,
     "params.stop"),
    ("huge stop string", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(stop=["s" * 10_000])), INVALID,
     "params.stop"),
    ("n too large", pb.GenerateRequest(prompt="x", n=1000, params=P), INVALID, "n"),
    ("n just over max_n", pb.GenerateRequest(prompt="x", n=9, params=P), INVALID, "n"),
    ("huge user_id", pb.GenerateRequest(prompt="x", user_id="u" * 10_000, params=P), INVALID, "user_id"),
    ("too much metadata", pb.GenerateRequest(prompt="x", metadata={str(i): "v" for i in range(100)}, params=P),
     INVALID, "metadata"),
    ("huge metadata value", pb.GenerateRequest(prompt="x", metadata={"k": "v" * 100_000}, params=P), INVALID,
     "metadata"),
]


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("name,request_,want,field", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate(gen, kit, method, name, request_, want, field):
    if method == "Generate":
        _check(lambda: gen.stub.Generate(request_, timeout=30), want, field, kit)
    else:
        _check(lambda: list(gen.stub.GenerateStream(request_, timeout=30)), want, field, kit)
    assert gen.stub.Generate(pb.GenerateRequest(prompt="still there?", params=P), timeout=30).completions[0].text


RAW_GENERATION_CASES = [
    # (name, method, bytes factory, code, field)
    ("invalid UTF-8 in prompt", "Generate",
     lambda ids: utf8_broken(pb.GenerateRequest(prompt="MARKER", params=P), "MARKER"), INVALID, "prompt"),
    ("invalid UTF-8 in a chat turn", "GenerateStream",
     lambda ids: utf8_broken(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi"),
                                                          pb.ChatMessage(role="user", content="MARKER")]), "MARKER"),
     INVALID, "messages[1].content"),
    ("invalid UTF-8 in a stop string", "Generate",
     lambda ids: utf8_broken(pb.GenerateRequest(prompt="x", params=pb.SamplingParams(stop=["MARK"])), "MARK"),
     INVALID, "params.stop"),
    ("not protobuf at all", "Generate", lambda ids: b"\xff" * 64, INVALID, "request"),
    ("oversized Generate (5 MiB)", "Generate",
     lambda ids: pb.GenerateRequest(prompt="a" * OVER_GRPC_LIMIT).SerializeToString(), TOO_BIG, "larger than max"),
    ("oversized GenerateStream", "GenerateStream",
     lambda ids: pb.GenerateRequest(prompt="a" * OVER_GRPC_LIMIT).SerializeToString(), TOO_BIG, "larger than max"),
    ("invalid UTF-8 in a comment", "SubmitFeedback",
     lambda ids: utf8_broken(pb.SubmitFeedbackRequest(completion_id=ids[0], rating=pb.RATING_THUMBS_UP,
                                                      comment="MARKER"), "MARKER"), INVALID, "comment"),
    ("oversized SubmitFeedback", "SubmitFeedback",
     lambda ids: pb.SubmitFeedbackRequest(completion_id=ids[0], comment="c" * OVER_GRPC_LIMIT).SerializeToString(),
     TOO_BIG, "larger than max"),
    ("oversized SubmitPreference", "SubmitPreference",
     lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id="x" * OVER_GRPC_LIMIT).SerializeToString(),
     TOO_BIG, "larger than max"),
    ("garbage GetPolicy", "GetPolicy", lambda ids: b"\x0a\x05ab", INVALID, "request"),
    ("oversized GetPolicy", "GetPolicy", lambda ids: b"\x0a" + b"\x80\x80\x80\x03" + b"x" * OVER_GRPC_LIMIT,
     TOO_BIG, "larger than max"),
]


@pytest.mark.parametrize("name,method,payload,want,field", RAW_GENERATION_CASES, ids=[c[0] for c in RAW_GENERATION_CASES])
def test_generation_wire_level(gen, kit, name, method, payload, want, field):
    call = raw(gen.channel, f"/rlhf_online.v1.Generation/{method}")
    if method == "GenerateStream":
        call = gen.channel.unary_stream(f"/rlhf_online.v1.Generation/{method}", request_serializer=None,
                                        response_deserializer=None)
        _check(lambda: list(call(payload(gen.ids), timeout=30)), want, field, kit)
    else:
        _check(lambda: call(payload(gen.ids), timeout=30), want, field, kit)
    assert gen.stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).base_model == "tiny"
    assert gen.stub.Generate(pb.GenerateRequest(prompt="still there?", params=P), timeout=30).completions


FEEDBACK_CASES = [
    ("empty completion_id", lambda ids: pb.SubmitFeedbackRequest(rating=pb.RATING_THUMBS_UP), INVALID,
     "completion_id"),
    ("unknown completion_id", lambda ids: pb.SubmitFeedbackRequest(completion_id="cmpl-0000dead",
                                                                   rating=pb.RATING_THUMBS_UP), NOT_FOUND,
     "cmpl-0000dead"),
    ("malformed (huge) completion_id", lambda ids: pb.SubmitFeedbackRequest(completion_id="c" * 5000,
                                                                            rating=pb.RATING_THUMBS_UP),
     INVALID, "completion_id"),
    ("rating unset", lambda ids: pb.SubmitFeedbackRequest(completion_id=ids[0]), INVALID, "rating"),
    ("rating out of the enum", lambda ids: pb.SubmitFeedbackRequest(completion_id=ids[0], rating=99), INVALID,
     "rating"),
    ("huge comment", lambda ids: pb.SubmitFeedbackRequest(completion_id=ids[0], rating=pb.RATING_THUMBS_UP,
                                                          comment="c" * 100_000), INVALID, "comment"),
    ("huge user_id", lambda ids: pb.SubmitFeedbackRequest(completion_id=ids[0], rating=pb.RATING_THUMBS_UP,
                                                          user_id="u" * 1000), INVALID, "user_id"),
]


@pytest.mark.parametrize("name,make,want,field", FEEDBACK_CASES, ids=[c[0] for c in FEEDBACK_CASES])
def test_submit_feedback(gen, kit, name, make, want, field):
    before = gen.store.count_feedback()
    _check(lambda: gen.stub.SubmitFeedback(make(gen.ids), timeout=10), want, field, kit)
    assert gen.store.count_feedback() == before  # nothing half-recorded
    assert gen.stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).base_model == "tiny"


PREFERENCE_CASES = [
    ("a completion against itself", lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id=ids[0],
                                                                           rejected_completion_id=ids[0]),
     INVALID, "rejected_completion_id"),
    ("empty chosen", lambda ids: pb.SubmitPreferenceRequest(rejected_completion_id=ids[0]), INVALID,
     "chosen_completion_id"),
    ("empty rejected", lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id=ids[0]), INVALID,
     "rejected_completion_id"),
    ("unknown rejected", lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id=ids[0],
                                                                rejected_completion_id="cmpl-nope"),
     NOT_FOUND, "cmpl-nope"),
    ("unknown chosen", lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id="cmpl-gone",
                                                              rejected_completion_id=ids[1]), NOT_FOUND, "cmpl-gone"),
    ("malformed (huge) chosen", lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id="x" * 1000,
                                                                       rejected_completion_id=ids[1]),
     INVALID, "chosen_completion_id"),
    ("huge user_id", lambda ids: pb.SubmitPreferenceRequest(chosen_completion_id=ids[0],
                                                            rejected_completion_id=ids[1], user_id="u" * 1000),
     INVALID, "user_id"),
]


@pytest.mark.parametrize("name,make,want,field", PREFERENCE_CASES, ids=[c[0] for c in PREFERENCE_CASES])
def test_submit_preference(gen, kit, name, make, want, field):
    before = gen.store.count_preferences()
    _check(lambda: gen.stub.SubmitPreference(make(gen.ids), timeout=10), want, field, kit)
    assert gen.store.count_preferences() == before
    assert gen.stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).base_model == "tiny"


RANKING_CASES = [  # ids: the two candidates of one request, then a reply to another prompt
    ("one id", lambda ids: pb.SubmitRankingRequest(completion_ids=ids[:1]), INVALID, "completion_ids"),
    ("no ids", lambda ids: pb.SubmitRankingRequest(user_id="u"), INVALID, "completion_ids"),
    ("more than max_n", lambda ids: pb.SubmitRankingRequest(completion_ids=[f"cmpl-{k}" for k in range(9)]),
     INVALID, "completion_ids"),
    ("an id twice (a tie)", lambda ids: pb.SubmitRankingRequest(completion_ids=[ids[0], ids[1], ids[0]]), INVALID,
     "completion_ids"),
    ("an empty id", lambda ids: pb.SubmitRankingRequest(completion_ids=[ids[0], ""]), INVALID, "completion_ids[1]"),
    ("a huge id", lambda ids: pb.SubmitRankingRequest(completion_ids=[ids[0], "x" * 1000]), INVALID,
     "completion_ids[1]"),
    ("an unknown id", lambda ids: pb.SubmitRankingRequest(completion_ids=[ids[0], "cmpl-missing", ids[1]]),
     NOT_FOUND, "cmpl-missing"),
    ("replies to different prompts", lambda ids: pb.SubmitRankingRequest(completion_ids=[ids[0], ids[2]]), INVALID,
     "completion_ids"),
    ("huge user_id", lambda ids: pb.SubmitRankingRequest(completion_ids=ids[:2], user_id="u" * 1000), INVALID,
     "user_id"),
]


@pytest.mark.parametrize("name,make,want,field", RANKING_CASES, ids=[c[0] for c in RANKING_CASES])
def test_submit_ranking(gen, kit, name, make, want, field):
    before = gen.store.count_rankings()
    _check(lambda: gen.stub.SubmitRanking(make([*gen.ids, gen.other]), timeout=10), want, field, kit)
    assert gen.store.count_rankings() == before  # nothing half-recorded
    assert gen.stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).base_model == "tiny"


def test_duplicates_are_ok_and_counted_once(gen, kit):
    a, b = gen.ids
    fb = pb.SubmitFeedbackRequest(completion_id=a, rating=pb.RATING_THUMBS_UP, user_id="dup")
    before = gen.store.count_feedback()
    dups = kit.sample("rlhf_feedback_duplicates_total")
    assert gen.stub.SubmitFeedback(fb, timeout=10).duplicate is False
    for _ in range(3):
        assert gen.stub.SubmitFeedback(fb, timeout=10).duplicate is True
    # A repeat with another rating is still the same user's one vote: the first is kept.
    other = pb.SubmitFeedbackRequest(completion_id=a, rating=pb.RATING_THUMBS_DOWN, user_id="dup")
    assert gen.stub.SubmitFeedback(other, timeout=10).duplicate is True
    assert gen.store.count_feedback() == before + 1
    assert kit.sample("rlhf_feedback_duplicates_total") == dups + 4
    assert [f.rating for f in gen.store.list_feedback() if f.user_id == "dup"] == ["thumbs_up"]
    pref = pb.SubmitPreferenceRequest(chosen_completion_id=a, rejected_completion_id=b, user_id="dup")
    assert gen.stub.SubmitPreference(pref, timeout=10).duplicate is False
    assert gen.stub.SubmitPreference(pref, timeout=10).duplicate is True
    rankings = kit.sample("rlhf_rankings_total", size="2")
    ranking = pb.SubmitRankingRequest(completion_ids=[a, b], user_id="dup")
    assert gen.stub.SubmitRanking(ranking, timeout=10).duplicate is False
    assert gen.stub.SubmitRanking(ranking, timeout=10).duplicate is True
    assert gen.stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=[b, a], user_id="dup"),
                                  timeout=10).duplicate is True  # the same candidates in another order
    assert kit.sample("rlhf_rankings_total", size="2") == rankings + 1
    assert [r.completion_ids for r in gen.store.list_rankings() if r.user_id == "dup"] == [(a, b)]


# ------------------------------------------------------------------------------------------------ Reward

ITEM = rw.ScoreItem(prompt="How was your day?", completion="Lovely, thanks!")

SCORE_CASES = [
    ("no items", rw.ScoreRequest(), INVALID, "items"),
    ("thousands of items", rw.ScoreRequest(items=[ITEM] * 5000), INVALID, "items"),
    ("one item over the limit", rw.ScoreRequest(items=[ITEM] * 1025), INVALID, "items"),
    ("huge prompt", rw.ScoreRequest(items=[ITEM, rw.ScoreItem(prompt="p" * 20_000, completion="c")]), INVALID,
     "items[1].prompt"),
    ("huge completion", rw.ScoreRequest(items=[rw.ScoreItem(prompt="p", completion="c" * 20_000)]), INVALID,
     "items[0].completion"),
    ("empty texts are fine", rw.ScoreRequest(items=[rw.ScoreItem()]), OK, ""),
    ("exactly at the limit", rw.ScoreRequest(items=[ITEM] * 1024), OK, ""),
]


@pytest.mark.parametrize("name,request_,want,field", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_score(reward, kit, name, request_, want, field):
    stub, _ = reward
    _check(lambda: stub.Score(request_, timeout=60), want, field, kit)
    assert len(stub.Score(rw.ScoreRequest(items=[ITEM]), timeout=30).scores) == 1


RAW_REWARD_CASES = [
    ("invalid UTF-8 in a completion", "Score",
     utf8_broken(rw.ScoreRequest(items=[ITEM, rw.ScoreItem(prompt="p", completion="MARKER")]), "MARKER"),
     INVALID, "items[1].completion"),
    ("oversized Score (5 MiB)", "Score", rw.ScoreRequest(items=[rw.ScoreItem(completion="c" * OVER_GRPC_LIMIT)])
     .SerializeToString(), TOO_BIG, "larger than max"),
    ("garbage Train", "Train", b"\xff\xff", INVALID, "request"),
    ("garbage GetRewardModel", "GetRewardModel", b"\x0a\x09", INVALID, "request"),
    ("unknown fields are ignored", "GetRewardModel", b"\x50\x01", OK, ""),
]


@pytest.mark.parametrize("name,method,payload,want,field", RAW_REWARD_CASES, ids=[c[0] for c in RAW_REWARD_CASES])
def test_reward_wire_level(reward, kit, name, method, payload, want, field):
    stub, running = reward
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    _check(lambda: raw(channel, f"/rlhf_online.v1.Reward/{method}")(payload, timeout=30), want, field, kit)
    assert len(stub.Score(rw.ScoreRequest(items=[ITEM]), timeout=30).scores) == 1


def test_train_and_info_on_a_reward_without_a_learned_part(reward):
    stub, _ = reward
    r = stub.Train(rw.TrainRewardRequest(), timeout=30)
    assert not r.promoted and "no learned part" in r.reason
    assert stub.GetRewardModel(rw.GetRewardModelRequest(), timeout=10).version == "sentiment"


# ------------------------------------------------------------------------------------------------ Trainer

ACTIVATE_CASES = [
    ("parent directory", "../x", INVALID, "version"),
    ("absolute path", "/etc/passwd", INVALID, "version"),
    ("path inside a version", "v000001/../../etc", INVALID, "version"),
    ("dot", ".", INVALID, "version"),
    ("short version", "v1", INVALID, "version"),
    ("trailing newline", "v000001\n", INVALID, "version"),
    ("non-ASCII digits", "v\u0660\u0660\u0660\u0660\u0660\u0661", INVALID, "version"),
    ("huge version", "v" * 100_000, INVALID, "version"),
    ("NUL byte", "v000001\x00", INVALID, "version"),
    ("unknown version", "v000099", NOT_FOUND, "v000099"),
    ("corrupt version", "v000002", INVALID, "version"),
]


@pytest.mark.parametrize("name,version,want,field", ACTIVATE_CASES, ids=[c[0] for c in ACTIVATE_CASES])
def test_activate_policy(trainer, kit, name, version, want, field):
    stub, registry, _ = trainer
    _check(lambda: stub.ActivatePolicy(tr.ActivatePolicyRequest(version=version), timeout=10), want, field, kit,
           sent=version)
    assert registry.current() == "v000001"  # nothing moved
    assert stub.GetStatus(tr.GetStatusRequest(), timeout=10).current == "v000001"


RAW_TRAINER_CASES = [
    ("invalid UTF-8 version", "ActivatePolicy", utf8_broken(tr.ActivatePolicyRequest(version="MARKER"), "MARKER"),
     INVALID, "version"),
    ("oversized ActivatePolicy", "ActivatePolicy",
     tr.ActivatePolicyRequest(version="v" * OVER_GRPC_LIMIT).SerializeToString(), TOO_BIG, "larger than max"),
    ("garbage RunRound", "RunRound", b"\x0b", INVALID, "request"),
    ("garbage GetStatus", "GetStatus", b"\xff", INVALID, "request"),
    ("garbage ListPolicies", "ListPolicies", b"\x12\x7f", INVALID, "request"),
]


@pytest.mark.parametrize("name,method,payload,want,field", RAW_TRAINER_CASES, ids=[c[0] for c in RAW_TRAINER_CASES])
def test_trainer_wire_level(trainer, kit, name, method, payload, want, field):
    stub, registry, running = trainer
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    _check(lambda: raw(channel, f"/rlhf_online.v1.Trainer/{method}")(payload, timeout=30), want, field, kit)
    assert registry.current() == "v000001"
    assert stub.ListPolicies(tr.ListPoliciesRequest(), timeout=10).current == "v000001"


def test_trainer_good_requests_after_the_table(trainer):
    stub, registry, _ = trainer
    r = stub.RunRound(tr.RunRoundRequest(), timeout=60)
    assert r.outcome == "skipped" and "min_prompts" in r.reason  # two logged prompts: too few for a round
    listed = stub.ListPolicies(tr.ListPoliciesRequest(), timeout=10)
    assert [p.version for p in listed.policies] == ["v000001", "v000002"] and listed.current == "v000001"
    assert stub.ActivatePolicy(tr.ActivatePolicyRequest(version=""), timeout=10).version == ""
    assert stub.ActivatePolicy(tr.ActivatePolicyRequest(version="v000001"), timeout=10).version == "v000001"
