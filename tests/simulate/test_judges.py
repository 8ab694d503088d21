"""The simulated users' judges and personas."""

from __future__ import annotations

import random
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
