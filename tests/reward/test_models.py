"""Classifier, profanity and weighted rewards, and the reward spec."""

from __future__ import annotations

import shutil

import pytest
import torch

from rlhf_online.errors import ConfigError
from rlhf_online.reward.encoder import default_encoder_path
from rlhf_online.reward.models import ClassifierReward, ProfanityReward, WeightedReward, parse_spec

TEXTS = ["Have a wonderful day, friend!", "Shut up, you stupid idiot."]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random sequence classifier saved as a local HF directory, labels hate / nothate."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("clf")
    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, id2label={0: "hate", 1: "nothate"},
                     label2id={"hate": 0, "nothate": 1})
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_classifier_reward_is_the_labels_logit(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = ClassifierReward(classifier_dir, "nothate")
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    batch = AutoTokenizer.from_pretrained(classifier_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits[:, 1].tolist()
    assert reward.score(["", ""], TEXTS) == pytest.approx(expected, abs=1e-5)
    assert ClassifierReward(classifier_dir, "1").score(["", ""], TEXTS) == pytest.approx(expected, abs=1e-5)
    assert reward.version == f"classifier:{classifier_dir.name}:nothate"


def test_classifier_errors(classifier_dir, tmp_path):
    with pytest.raises(ConfigError, match="reward_label"):
        ClassifierReward(classifier_dir, "toxic")
    shutil.copytree(classifier_dir, tmp_path / "broken")
    (tmp_path / "broken" / "config.json").unlink()
    with pytest.raises(ConfigError, match="reward_classifier"):
        ClassifierReward(tmp_path / "broken", "nothate")


def test_profanity_reward_prefers_clean_text():
    clean, rude = ProfanityReward().score(["", ""], TEXTS)
    assert 0.0 <= rude < 0.5 < clean <= 1.0


def test_weighted_reward_is_the_weighted_sum(classifier_dir):
    clf, prof = ClassifierReward(classifier_dir, "nothate"), ProfanityReward()
    combo = WeightedReward([(clf, 0.7), (prof, 0.3)])
    a, b = clf.score(["", ""], TEXTS), prof.score(["", ""], TEXTS)
    assert combo.score(["", ""], TEXTS) == pytest.approx([0.7 * x + 0.3 * y for x, y in zip(a, b, strict=True)])
    assert combo.version.startswith("0.7*classifier:")


def test_parse_spec():
    assert parse_spec("learned") == [("learned", 1.0)]
    assert parse_spec("learned=0.7, profanity=0.3") == [("learned", 0.7), ("profanity", 0.3)]
    for bad in ("magic", "learned=x"):
        with pytest.raises(ConfigError, match="reward_model"):
            parse_spec(bad)


def test_sentiment_reward_is_vader_compound():
    from rlhf_online.reward.models import SentimentReward
    from rlhf_online.simulate.judges import sentiment

    assert SentimentReward().score(["", ""], TEXTS) == sentiment(TEXTS)
    assert parse_spec("sentiment=1,profanity=0.5") == [("sentiment", 1.0), ("profanity", 0.5)]
