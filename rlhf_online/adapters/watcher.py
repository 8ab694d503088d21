"""Each generation replica watches the registry's CURRENT and hot-swaps to the version it names.

The new version is validated (hashes, base model, shapes) and loaded beside the old one; new
requests then go to it while requests already running finish on the version they started on,
and the engine unloads the old version once nothing uses it. A version that fails validation
or loading is refused and counted, and the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time

from rlhf_online import metrics
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.adapters.validate import validate_adapter
from rlhf_online.engine.engine import Engine

log = logging.getLogger("rlhf_online.adapters")


class AdapterWatcher:
    """Polls CURRENT and switches the engine to it."""

    def __init__(self, registry: AdapterRegistry, engine: Engine, *, base_model: str, poll_seconds: float = 2.0) -> None:
        self.registry, self.engine, self.base_model, self.poll_seconds = registry, engine, base_model, poll_seconds
        self.refused: set[str] = set()  # versions that failed: not retried until CURRENT moves on
        self.polls = 0  # checks started so far
        self.switched_on_poll = 0  # the number of the check that made the latest switch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str:
        """One poll: switch to CURRENT if it changed; returns the version served afterwards."""
        self.polls += 1
        poll = self.polls
        wanted = self.registry.current()
        if wanted == self.engine.policy_version or wanted in self.refused:
            return self.engine.policy_version
        t0 = time.perf_counter()
        try:
            if wanted and wanted not in self.engine.loaded_versions():
                validate_adapter(self.registry.path(wanted), base_model=self.base_model, model=self.engine.model)
                self.engine.load_adapter(wanted, self.registry.path(wanted))
            self.engine.set_current(wanted)
        except Exception as e:  # whatever went wrong (a malformed config fails inside PEFT with a TypeError)
            self.refused.add(wanted)
            metrics.ADAPTER_SWAPS.labels("failed").inc()
            log.error("adapter refused; the old version keeps serving",
                      extra={"version": wanted, "serving": self.engine.policy_version, "error": str(e)})
            return self.engine.policy_version
        seconds = time.perf_counter() - t0
        self.switched_on_poll = poll
        metrics.ADAPTER_SWAPS.labels("ok").inc()
        metrics.ADAPTER_SWAP_SECONDS.observe(seconds)
        log.info("policy switched", extra={"version": wanted or "(base)", "seconds": round(seconds, 3)})
        return wanted

    def run(self) -> None:
        """Poll until stopped; a failing poll is logged, never fatal."""
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:
                log.exception("adapter watcher poll failed")
            self._stop.wait(self.poll_seconds)

    def start(self) -> AdapterWatcher:
        """Poll in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="adapter-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
