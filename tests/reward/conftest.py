"""Reward fixtures: synthetic feedback."""

from __future__ import annotations

import pytest


@pytest.fixture
def filled_store(tmp_path):
    """A store with synthetic feedback from users with a known hidden preference."""
    from rlhf_online.simulate.synthetic import fill_store
    from rlhf_online.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    fill_store(store)
    yield store
    store.close()
