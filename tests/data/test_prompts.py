"""The shipped demo prompt set: sizes, balance, uniqueness, and no held-out prompt leaking from train."""

from __future__ import annotations

import itertools
import re

import pytest

from rlhf_online.data.prompts import CATEGORIES, Prompt, load_prompts

PREFIX = {"train": "t", "heldout": "h"}


def words(text: str) -> set[str]:
    """The lowercased set of words of a prompt, punctuation dropped."""
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def normalised(text: str) -> str:
    """A prompt with case and whitespace folded, for exact-duplicate checks."""
    return " ".join(text.lower().split())


def test_sizes_ids_and_uniqueness():
    train, held = load_prompts("train"), load_prompts("heldout")
    assert len(train) >= 400 and len(held) >= 100
    assert all(isinstance(p, Prompt) for p in train + held)
    every = train + held
    assert len({p.id for p in every}) == len(every)
    assert len({normalised(p.prompt) for p in every}) == len(every)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ids_categories_balance_and_lengths(split):
    prompts = load_prompts(split)
    assert all(re.fullmatch(rf"{PREFIX[split]}\d{{4}}", p.id) for p in prompts)
    assert {p.category for p in prompts} == set(CATEGORIES)
    for c in CATEGORIES:
        assert sum(p.category == c for p in prompts) >= 0.08 * len(prompts), c
    too_short_or_long = [p.prompt for p in prompts if not 5 <= len(p.prompt.split()) <= 40]
    assert not too_short_or_long
    # a reply to a rude message quotes that message
    assert all('"' in p.prompt for p in prompts if p.category == "rude_reply")


def test_no_held_out_prompt_is_a_near_copy_of_a_train_prompt():
    train, held = load_prompts("train"), load_prompts("heldout")
    for h, t in itertools.product(held, train):
        a, b = words(h.prompt), words(t.prompt)
        assert len(a & b) / len(a | b) < 0.8, (h.prompt, t.prompt)


@pytest.mark.parametrize("split", ["test", "", "Train"])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        load_prompts(split)
