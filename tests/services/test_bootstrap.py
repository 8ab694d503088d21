"""Start-up of a serving process: the heap it built is left out of the collector's full collections."""

from __future__ import annotations

import gc
import logging

from services.bootstrap import freeze_startup_heap


def test_the_startup_heap_is_frozen_and_the_count_logged(caplog):
    held = [[i] for i in range(1000)]  # long-lived objects made at start-up (lists are tracked by the collector)
    caplog.set_level(logging.INFO, logger="rlhf_online.bootstrap")
    try:
        freeze_startup_heap()
        # Frozen objects sit in the permanent generation: no collection, full or not, walks them any more.
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in walked for o in held)
        assert gc.get_freeze_count() >= len(held)
        # the count as frozen (frozen objects that reference counting frees since leave it, so it is not compared)
        record = next(r for r in caplog.records if r.getMessage() == "startup heap frozen")
        assert record.objects >= len(held)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    walked = {id(o) for o in gc.get_objects()}
    assert all(id(o) in walked for o in held)
