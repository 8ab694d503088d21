"""Rankings in reward training: every pair of a ranking, weighted so that one ranking weighs as one preference."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from rlhf_online.data.split import is_heldout
from rlhf_online.reward.training import Split, TrainConfig, build_dataset, evaluate, prompt_key, train
from rlhf_online.store import CompletionRecord, Store, open_store


@pytest.fixture
def store(tmp_path) -> Store:
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as s:
        yield s


def log_replies(store: Store, prompt: str, texts: list[str], prefix: str) -> list[str]:
    """Log replies to one prompt; their ids in order."""
    ids = [f"{prefix}-{k}" for k in range(len(texts))]
    store.add_completions([CompletionRecord(completion_id=i, prompt=prompt, messages=(), text=t, policy_version="")
                           for i, t in zip(ids, texts, strict=True)])
    return ids


def test_a_ranking_of_four_is_one_row_and_six_pairs_weighing_one_preference(store: Store) -> None:
    ids = log_replies(store, "Greet me", ["hello", "hi", "yo", "go away"], "r")
    ranked = [ids[1], ids[0], ids[2], ids[3]]
    assert store.add_ranking(ranked, "u1")
    assert not store.add_ranking(list(reversed(ranked)), "u1")  # the same user's same candidates: a duplicate
    assert store.count_rankings() == 1
    data = build_dataset(store, TrainConfig(heldout_percent=0))
    assert data.feedback_seen == 1
    assert data.train.pairs == list(combinations(ranked, 2))  # each earlier one over each later one
    assert data.train.pair_weights == [pytest.approx(1 / 6)] * 6 and data.train.pair_weight == pytest.approx(1.0)
    assert set(data.train.completions) == set(ids)


def test_preferences_and_implied_thumbs_pairs_keep_weight_one(store: Store) -> None:
    a, b, c = log_replies(store, "Greet me", ["hello", "hi", "go away"], "x")
    store.add_preference(a, c, "u1")
    store.add_feedback(b, "u2", "thumbs_up")
    store.add_feedback(c, "u2", "thumbs_down")
    store.add_ranking([b, a, c], "u3")
    data = build_dataset(store, TrainConfig(heldout_percent=0))
    weighted = list(zip(data.train.pairs, data.train.pair_weights, strict=True))
    third = pytest.approx(1 / 3)
    # The preference, the ranking's three pairs, then the pair implied by b's thumbs up and c's down.
    assert weighted == [((a, c), 1.0), ((b, a), third), ((b, c), third), ((a, c), third), ((b, c), 1.0)]
    assert data.train.pair_weight == pytest.approx(1 + 1 + 1)  # preference, one ranking, one implied pair


def test_the_heldout_split_never_separates_a_rankings_pairs(store: Store) -> None:
    rankings = []
    for p in range(40):
        ids = log_replies(store, f"prompt number {p}", [f"reply {k} to {p}" for k in range(4)], f"p{p}")
        store.add_ranking(ids[::-1] if p % 2 else ids, f"user-{p}")
        rankings.append(ids)
    data = build_dataset(store, TrainConfig(heldout_percent=50))
    assert data.train.pairs and data.heldout.pairs  # both sides got rankings
    for ids in rankings:
        sides = {side for side, split in (("train", data.train), ("heldout", data.heldout))
                 for pair in split.pairs if set(pair) <= set(ids)}
        in_pairs = [pair for split in (data.train, data.heldout) for pair in split.pairs if set(pair) <= set(ids)]
        assert len(sides) == 1 and len(in_pairs) == 6
        side = data.heldout if sides == {"heldout"} else data.train
        assert set(ids) <= set(side.completions)
        assert is_heldout(prompt_key(side.completions[ids[0]]), 50) == (sides == {"heldout"})


def test_heldout_accuracy_weighs_a_ranking_as_one_judgement() -> None:
    class Scores:  # raw_scores of a model that orders every pair of the ranking wrongly, the preference rightly
        cfg = None

        def raw_scores(self, feats):
            import torch

            return torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 4.0])

    split = Split(completions={c: CompletionRecord(completion_id=c, prompt="p", messages=(), text=c, policy_version="")
                               for c in "abcdef"})
    for better, worse in combinations("abcd", 2):  # ranked a > b > c > d, scored the other way round
        split.add_pair(better, worse, 1 / math.comb(4, 2))
    split.add_pair("e", "f")

    class NoEncoder:
        dim, layer = 4, 0

    import rlhf_online.reward.training as training

    original = training._features
    training._features = lambda encoder, s: (None, {c: k for k, c in enumerate(s.completions)})
    try:
        got = evaluate(Scores(), NoEncoder(), split)
    finally:
        training._features = original
    assert got["pairwise_accuracy"] == pytest.approx(0.5)  # 1 of 2 judgements right (1/7 if pairs were counted)
    assert got["heldout_pairs"] == 7


def test_training_weighs_a_ranking_as_one_preference(store: Store, encoder) -> None:
    # One user ranks a > b > c > d; another prefers d over a. As one judgement against one, the direct
    # preference outweighs the ranking's single a-over-d pair (1/6): d ends above a. Counted as six
    # independent pairs the ranking would win instead (a over d, b over d, c over d against d over a).
    a, b, c, d = log_replies(store, "Describe the weather.", ["Sunny and warm, a lovely day.", "Mild with clouds.",
                                                              "Grey drizzle all day.", "Cold, wet and miserable."], "w")
    store.add_ranking([a, b, c, d], "ranker")
    store.add_preference(d, a, "other")
    cfg = TrainConfig(heldout_percent=0, ensemble=1, pessimism=0.0, weight_decay=0.0, epochs=1500, lr=1e-2)
    model = train(encoder, build_dataset(store, cfg), cfg, "v1")
    texts = {cid: store.get_completion(cid).text for cid in (a, b, c, d)}
    s = dict(zip(texts, model.score(["Describe the weather."] * 4, list(texts.values())), strict=True))
    assert s[d] > s[a]
