"""The simulated users' judges and personas."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from rlhf_online.simulate.judges import PERSONAS, sentiment, toxicity

KIND, RUDE = "Thank you so much, that sounds lovely!", "Shut up, you stupid idiot, this is crap."


def test_judges_score_tone_and_offence():
    s_kind, s_rude = sentiment([KIND, RUDE])
    t_kind, t_rude = toxicity([KIND, RUDE])
    assert s_kind > 0.5 > -0.5 > s_rude
    assert t_kind < 0.2 < 0.8 < t_rude
    assert toxicity([]) == []


def test_personas_prefer_kind_replies_and_noise_flips_some_ratings():
    for persona in PERSONAS.values():
        clean = replace(persona, noise=0.0)
        assert clean.rate([KIND, RUDE], random.Random(0)) == ["thumbs_up", "thumbs_down"]
        assert clean.prefer(KIND, RUDE, random.Random(0)) == 0 and clean.prefer(RUDE, KIND, random.Random(0)) == 1
        noisy = replace(persona, noise=0.3)
        rng = random.Random(1)
        flips = sum(noisy.rate([KIND], rng) == ["thumbs_down"] for _ in range(400))
        assert 80 < flips < 160  # about 30% of 400


def test_a_ranking_of_two_is_a_preference_rolled_on_the_same_dice():
    persona = replace(PERSONAS["polite"], noise=0.3)
    for sa, sb in ((0.4, -0.2), (-0.2, 0.4), (0.1, 0.1)):  # a tie too: broken at random, as a preference breaks it
        for seed in range(200):
            better = persona.prefer_scores(sa, sb, random.Random(seed))
            assert persona.rank_scores([sa, sb], random.Random(seed)) == [better, 1 - better]


def test_a_noise_free_ranking_is_the_hidden_order():
    persona = replace(PERSONAS["positive"], noise=0.0)
    rng = random.Random(2)
    for k in range(2, 9):
        scores = [rng.uniform(-1, 1) for _ in range(k)]
        assert persona.rank_scores(scores, rng) == sorted(range(k), key=lambda i: -scores[i])


def test_a_noisy_ranking_still_puts_the_true_best_first_most_often():
    persona = replace(PERSONAS["polite"], noise=0.2)
    rng = random.Random(3)
    # The best reply first and last in the order given: inserted last it must win three comparisons in a row.
    for scores in ([0.9, 0.1, 0.5, -0.3], [-0.3, 0.5, 0.1, 0.9]):
        tops = Counter(persona.rank_scores(scores, rng)[0] for _ in range(1000))
        best = scores.index(max(scores))
        assert tops.most_common(1)[0][0] == best and tops[best] > 400  # ~0.52 (last) to ~0.68 (first)
        assert tops[best] < 1000  # the noise does reorder some rankings
