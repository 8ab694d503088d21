"""Synthetic feedback with a known hidden preference (phrase mixes), for tests and the reward benchmark."""

from __future__ import annotations

import random

from rlhf_online.store import CompletionRecord, Store

POSITIVE = ["I'd be glad to help with that.", "Thank you so much for asking!", "What a lovely idea.",
            "I really appreciate your patience.", "That sounds wonderful, well done.", "Happy to support you.",
            "You handled that kindly.", "Great question, here is a friendly answer."]
NEGATIVE = ["That's a stupid thing to ask.", "Honestly, this is terrible.", "Go away, I hate this.",
            "What an awful, useless idea.", "You are an idiot for trying.", "This is the worst, stop whining.",
            "Ugh, pathetic and boring.", "Nobody cares, it's garbage."]
NEUTRAL = ["The meeting is at three.", "Here is the list of items.", "The report has four sections.",
           "Trains leave every hour.", "Write the date at the top.", "Use a short subject line."]
TOPICS = ["my landlord", "the new phone", "a rude coworker", "Mondays", "my cooking", "the airline",
          "the cafe", "my neighbour", "traffic", "the gym", "a late parcel", "the weather", "my haircut",
          "the office", "the train", "a noisy party", "my garden", "the bank", "homework", "the dentist"]


def completion_text(rng: random.Random) -> tuple[str, int]:
    """A reply mixing phrases; its hidden quality is (#positive - #negative)."""
    pos, neg = rng.randint(0, 2), rng.randint(0, 2)
    phrases = rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg) + rng.sample(NEUTRAL, rng.randint(1, 2))
    rng.shuffle(phrases)
    return " ".join(phrases), pos - neg


def fill_store(store: Store, *, prompts: int = 60, per_prompt: int = 4, noise: float = 0.1, seed: int = 0) -> dict[str, int]:
    """Completions of many prompts rated by users with the hidden preference; returns id -> hidden quality."""
    rng = random.Random(seed)
    quality: dict[str, int] = {}
    for p in range(prompts):
        prompt = f"Write a reply about {TOPICS[p % len(TOPICS)]} (case {p})."
        records = []
        for k in range(per_prompt):
            text, q = completion_text(rng)
            cid = f"c{p}-{k}"
            quality[cid] = q
            records.append(CompletionRecord(completion_id=cid, prompt=prompt, messages=(), text=text, policy_version=""))
        store.add_completions(records)
        for r in records:
            up = quality[r.completion_id] > 0 or (quality[r.completion_id] == 0 and rng.random() < 0.5)
            up = (not up) if rng.random() < noise else up
            store.add_feedback(r.completion_id, f"user{p}", "thumbs_up" if up else "thumbs_down")
        a, b = rng.sample(records, 2)
        if quality[a.completion_id] != quality[b.completion_id]:
            better, worse = (a, b) if quality[a.completion_id] > quality[b.completion_id] else (b, a)
            store.add_preference(better.completion_id, worse.completion_id, f"user{p}")
    return quality
