"""The Reward gRPC service in-process on port 0: scoring, training, gating, retraining, auth, errors."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest

from rlhf_online.config import RewardSettings, project
from rlhf_online.reward.ratings import RatingRule
from rlhf_online.reward.runtime import RewardConfig, RewardRuntime
from rlhf_online.simulate.synthetic import fill_store
from rlhf_online.store import CompletionRecord, RatingEvidence, open_store
from rlhf_online.v1 import reward_pb2 as pb
from rlhf_online.v1 import reward_pb2_grpc as pb_grpc
from services.reward import start_reward_server

ITEMS = [pb.ScoreItem(prompt="How was your day?", completion=c) for c in
         ["It was lovely, thank you for asking!", "Terrible. Leave me alone, idiot.", "Fine."]]


@pytest.fixture
def reward(tmp_path, encoder, monkeypatch):
    """Start a reward server; returns a factory taking settings overrides -> (stub, runtime, running)."""
    import rlhf_online.reward.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "TextEncoder", lambda *a, **k: encoder)  # share the loaded encoder
    servers = []

    def start(**overrides):
        settings = RewardSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path,
                                  store_url=f"sqlite:///{tmp_path / 'store.db'}", **overrides)
        runtime = RewardRuntime(project(RewardConfig, settings), open_store(settings.store_url))
        running = start_reward_server(settings, runtime)
        servers.append(running)
        return pb_grpc.RewardStub(grpc.insecure_channel(f"127.0.0.1:{running.port}")), runtime, running

    yield start
    for s in servers:
        s.shutdown(1)


def code(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_untrained_then_trained_and_served(reward):
    stub, runtime, running = reward()
    s = stub.Score(pb.ScoreRequest(items=ITEMS), timeout=30)
    assert list(s.scores) == [0.0, 0.0, 0.0] and s.reward_model_version == ""
    r = stub.Train(pb.TrainRewardRequest(), timeout=60)
    assert not r.promoted and "not enough feedback" in r.reason
    fill_store(runtime.store)
    r = stub.Train(pb.TrainRewardRequest(), timeout=120)
    assert r.promoted and r.model.version == "r000001" and r.model.metrics["pairwise_accuracy"] > 0.75
    assert r.model.feedback_seen == runtime.store.count_feedback() + len(runtime.store.list_preferences())
    info = stub.GetRewardModel(pb.GetRewardModelRequest(), timeout=10)
    assert info.version == "r000001" and "pointwise_accuracy" in info.metrics and "ece" in info.metrics
    kind, rude, _ = stub.Score(pb.ScoreRequest(items=ITEMS), timeout=30).scores
    assert kind > rude
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
    for series in ("rlhf_reward_score_count", "rlhf_reward_model_version 1.0", "rlhf_reward_heldout_accuracy",
                   "rlhf_reward_training_seconds_count", "rlhf_reward_feedback_seen",
                   'rlhf_grpc_requests_total{code="OK",method="Score",service="Reward"}'):
        assert series in text, series


def test_background_retraining_after_enough_new_feedback(reward):
    stub, runtime, _ = reward(retrain_min_feedback=50, retrain_interval_seconds=0.2)
    fill_store(runtime.store)
    deadline = time.time() + 60
    while stub.GetRewardModel(pb.GetRewardModelRequest(), timeout=10).version != "r000001":
        assert time.time() < deadline, "no background retraining"
        time.sleep(0.2)


def test_a_failed_background_retrain_keeps_the_served_model(reward, monkeypatch, tmp_path):
    from support import sample, wait_for

    import rlhf_online.reward.training as training

    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:  # all of it there before the service starts,
        fill_store(store)  # so the retrainer trains exactly once by itself
    stub, runtime, _ = reward(retrain_min_feedback=50, retrain_interval_seconds=0.2)
    wait_for(lambda: stub.GetRewardModel(pb.GetRewardModelRequest(), timeout=10).version == "r000001", 300,
             "the first background training")
    scores = list(stub.Score(pb.ScoreRequest(items=ITEMS), timeout=30).scores)
    failed = sample("rlhf_reward_trainings_total", outcome="failed")
    done = sum(sample("rlhf_reward_trainings_total", outcome=o) for o in ("promoted", "rejected"))

    def out_of_memory(*args, **kwargs):
        raise MemoryError("out of memory while fitting the heads")

    monkeypatch.setattr(training, "train", out_of_memory)
    for user in ("later-1", "later-2"):  # plenty of new feedback: a background retrain is due
        for f in runtime.store.list_feedback():
            runtime.store.add_feedback(f.completion_id, user, f.rating)
    wait_for(lambda: sample("rlhf_reward_trainings_total", outcome="failed") > failed, 120, "a failed retrain")
    served = stub.GetRewardModel(pb.GetRewardModelRequest(), timeout=10)
    assert served.version == "r000001" and runtime.registry.versions() == ["r000001"]
    assert list(stub.Score(pb.ScoreRequest(items=ITEMS), timeout=30).scores) == scores  # the same model scores
    monkeypatch.undo()  # the fault clears: the retrainer tries again by itself and trains a candidate
    wait_for(lambda: sum(sample("rlhf_reward_trainings_total", outcome=o) for o in ("promoted", "rejected")) > done,
             300, "the retrain after the failure")
    assert runtime.registry.versions() == ["r000001", "r000002"]


def test_retraining_waits_for_the_count_and_for_growth(reward):
    _, runtime, _ = reward(retrain_min_feedback=32, retrain_growth=0.25)
    assert not runtime.retrain_due(31) and runtime.retrain_due(32)
    runtime._seen_at_last_train = 400  # later retrains wait for 25% more feedback, not 32 more
    assert not runtime.retrain_due(432) and not runtime.retrain_due(499) and runtime.retrain_due(500)


def test_pinned_version_stays_served(reward, tmp_path):
    # No background retrains (their first check comes 30 s after start): only the explicit Train calls
    # make versions, however slow a loaded machine trains.
    stub, runtime, running = reward(retrain_interval_seconds=3600)
    fill_store(runtime.store)
    stub.Train(pb.TrainRewardRequest(), timeout=120)
    running.shutdown(1)
    stub, runtime, _ = reward(pin_version="r000001", retrain_interval_seconds=3600)
    assert stub.Train(pb.TrainRewardRequest(), timeout=120).model.version == "r000002"
    assert stub.GetRewardModel(pb.GetRewardModelRequest(), timeout=10).version == "r000001"


def test_weighted_reward_with_profanity(reward):
    stub, _, _ = reward(reward_model="learned=1,profanity=2")
    s = stub.Score(pb.ScoreRequest(items=ITEMS), timeout=30)
    assert s.scores[0] > s.scores[1] and s.reward_model_version == "1*learned+2*profanity"


def test_bad_requests(reward):
    stub, _, _ = reward(max_score_items=100, max_text_chars=1000)
    cases = {
        "items": pb.ScoreRequest(),
        "items ": pb.ScoreRequest(items=[ITEMS[0]] * 101),
        "items[1].completion": pb.ScoreRequest(items=[ITEMS[0], pb.ScoreItem(prompt="p", completion="x" * 1001)]),
    }
    for field, req in cases.items():
        got, details = code(lambda req=req: stub.Score(req, timeout=10))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and field.strip() in details, (field, details)
    assert stub.Score(pb.ScoreRequest(items=ITEMS), timeout=10).scores  # still serving


def log(store, *texts: str) -> list[str]:
    """Log ITEMS' prompt with these replies as completions; their ids."""
    ids = [f"cmpl-{k}" for k in range(len(texts))]
    store.add_completions([CompletionRecord(completion_id=cid, prompt=ITEMS[0].prompt, messages=(), text=t,
                                            policy_version="") for cid, t in zip(ids, texts, strict=True)])
    return ids


def test_users_ratings_are_the_reward_of_a_rated_completion(reward):
    from support import sample

    from services.trainer import reward_client

    # profanity: a model score that is not 0 and needs no training, so the prior term shows
    stub, runtime, running = reward(reward_model="profanity", rating_reward=1.5, rating_prior_weight=0.5)
    prompt, rude = ITEMS[0].prompt, ITEMS[1].completion
    liked, disputed, unrated = log(runtime.store, rude, rude, rude)
    runtime.store.add_feedback(liked, "u1", "thumbs_up")
    runtime.store.add_feedback(disputed, "u1", "thumbs_down")
    runtime.store.add_preference(disputed, liked, "u2")
    before = {src: sample("rlhf_reward_scored_items_total", source=src) for src in ("ratings", "model")}
    [plain] = stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt=prompt, completion=rude)]), timeout=30).scores
    items = [pb.ScoreItem(prompt=prompt, completion=rude, completion_id=cid) for cid in (liked, disputed, unrated, "")]
    got = list(stub.Score(pb.ScoreRequest(items=items), timeout=30).scores)
    rule = RatingRule(rating_reward=1.5, prior_weight=0.5)
    assert plain < 0.5  # the model alone calls it offensive
    assert got[0] == pytest.approx(rule.combine(plain, RatingEvidence(thumbs_up=1, dispreferred=1)), rel=1e-6)
    assert got[1] == pytest.approx(rule.combine(plain, RatingEvidence(thumbs_down=1, preferred=1)), rel=1e-6)
    assert got[0] == pytest.approx(0.5 * plain / 2.5, rel=1e-6)  # a split vote: the model breaks the tie
    assert got[2] == pytest.approx(plain, rel=1e-6) and got[3] == pytest.approx(plain, rel=1e-6)  # the model's
    [before_rating] = stub.Score(pb.ScoreRequest(items=[items[2]]), timeout=30).scores
    runtime.store.add_feedback(unrated, "u1", "thumbs_up")
    [now_liked] = stub.Score(pb.ScoreRequest(items=[items[2]]), timeout=30).scores
    assert now_liked == pytest.approx((0.5 * plain + 1.5) / 1.5, rel=1e-6) and now_liked > before_rating
    assert sample("rlhf_reward_scored_items_total", source="ratings") - before["ratings"] == 3
    assert sample("rlhf_reward_scored_items_total", source="model") - before["model"] == 4
    # the trainer's client: two arguments as before, the ids when it has them
    client = reward_client(f"127.0.0.1:{running.port}", 30)
    assert client([prompt], [rude]) == pytest.approx([plain], rel=1e-6)
    assert client([prompt] * 2, [rude] * 2, [unrated, ""]) == pytest.approx([now_liked, plain], rel=1e-6)
    # A ranking is one verdict on each of its completions: ranked last of three is one vote against.
    runtime.store.add_ranking([liked, disputed, unrated], "u3")
    [ranked_last] = stub.Score(pb.ScoreRequest(items=[items[2]]), timeout=30).scores
    assert ranked_last == pytest.approx((0.5 * plain + 1.5 - 1.5) / 2.5, rel=1e-6)


def test_ratings_alone_need_no_model_score(reward, monkeypatch):
    import rlhf_online.reward.runtime as runtime_module

    stub, runtime, _ = reward(reward_model="profanity", rating_prior_weight=0)
    liked, unrated = log(runtime.store, "Fine.", "Fine.")
    runtime.store.add_feedback(liked, "u1", "thumbs_up")
    calls, real = [], runtime_module.ProfanityReward.score

    def counted(self, prompts, completions):
        calls.append(len(completions))
        return real(self, prompts, completions)

    monkeypatch.setattr(runtime_module.ProfanityReward, "score", counted)
    item = {"prompt": ITEMS[0].prompt, "completion": "Fine."}
    assert list(stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(**item, completion_id=liked)]), timeout=30).scores) \
        == [2.0] and calls == []
    s = stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(**item, completion_id=c) for c in (liked, unrated)]), timeout=30)
    assert s.scores[0] == 2.0 and calls == [1]  # only the unrated item went to the model


def test_an_unknown_completion_id_is_not_found(reward):
    stub, runtime, _ = reward(reward_model="profanity")
    [known] = log(runtime.store, "Fine.")
    items = [pb.ScoreItem(prompt="p", completion="Fine.", completion_id=c) for c in (known, "", "cmpl-nope")]
    got, details = code(lambda: stub.Score(pb.ScoreRequest(items=items), timeout=10))
    assert got == grpc.StatusCode.NOT_FOUND and "items[2].completion_id" in details and "cmpl-nope" in details
    assert len(stub.Score(pb.ScoreRequest(items=items[:2]), timeout=10).scores) == 2  # still serving


def test_train_needs_the_admin_token(reward):
    stub, _, _ = reward(admin_token="s3cret")
    assert code(lambda: stub.Train(pb.TrainRewardRequest(), timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer nope"),)
    assert code(lambda: stub.Train(pb.TrainRewardRequest(), timeout=10, metadata=wrong))[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    right = (("authorization", "Bearer s3cret"),)
    assert stub.Train(pb.TrainRewardRequest(), timeout=60, metadata=right).reason
    assert stub.Score(pb.ScoreRequest(items=ITEMS), timeout=10).scores  # scoring needs no token


def test_the_trainer_asks_for_a_first_reward_model_instead_of_waiting(reward, monkeypatch):
    from services.trainer import reward_readiness

    stub, runtime, running = reward(admin_token="s3cret", retrain_interval_seconds=3600)
    trainings = []
    real_train = runtime.train
    monkeypatch.setattr(runtime, "train", lambda: (trainings.append(1), real_train())[1])
    addr = f"127.0.0.1:{running.port}"
    readiness = reward_readiness(addr, "s3cret", ask_every=3600)
    assert "no trained reward model yet" in readiness() and len(trainings) == 1  # nothing to train on yet
    assert "no trained reward model yet" in readiness() and len(trainings) == 1  # asks at most every ask_every
    fill_store(runtime.store)
    assert "UNAUTHENTICATED" in reward_readiness(addr, "wrong", ask_every=0)()
    assert reward_readiness(addr, "s3cret", ask_every=0)() == ""
    assert stub.GetRewardModel(pb.GetRewardModelRequest(), timeout=10).version == "r000001"
