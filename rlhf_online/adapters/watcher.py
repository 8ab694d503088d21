"""Each generation replica watches the registry's CURRENT and CANARY and hot-swaps to the versions they name.

A new version is validated (hashes, base model, shapes) and loaded beside the old ones; new
requests then go to it while requests already running finish on the version they started on,
and the engine unloads a version once nothing uses it. A version that fails validation or
loading is refused and counted, and the old stable version keeps serving; a canary is dropped
before a different one is loaded, so a refused one leaves no canary (never the one before it).
CANARY is read before CURRENT: a promotion writes CURRENT first, so the pair read is never a
promoted version missing from both pointers, and CURRENT is applied first, so the promoted
version moves from canary to stable without being unloaded.
"""

from __future__ import annotations

import logging
import threading
import time

from rlhf_online import metrics
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.adapters.validate import validate_adapter
from rlhf_online.engine.interface import ServingEngine
from rlhf_online.errors import InvalidArgument

log = logging.getLogger("rlhf_online.adapters")


class AdapterWatcher:
    """Polls CURRENT and CANARY and switches the engine to them.

    Between polls it stats the two pointer files every `notice_seconds` and checks at once when one
    was replaced, so a new version is picked up within a stat interval plus its load rather than up to
    a poll interval later (a stat is cheap enough to repeat that often, on a shared volume too; inotify
    would not see another node's writes on NFS). The poll stays, in case a filesystem's stat misses one.
    """

    def __init__(self, registry: AdapterRegistry, engine: ServingEngine, *, base_model: str, poll_seconds: float = 2.0,
                 notice_seconds: float = 0.0) -> None:
        self.registry, self.engine, self.base_model, self.poll_seconds = registry, engine, base_model, poll_seconds
        self.notice_seconds = notice_seconds
        self.refused: set[str] = set()  # versions that failed: never retried (a version's files do not change)
        self.polls = 0  # checks started so far
        self.switched_on_poll = 0  # the number of the check that made the latest switch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str:
        """One poll: follow CURRENT, then CANARY, where they changed; returns the stable version served afterwards."""
        self.polls += 1
        poll = self.polls
        canary = self.registry.canary()
        if self._follow("stable", self.registry.current(), self.engine.policy_version, self.engine.set_current):
            self.switched_on_poll = poll
        if canary == self.engine.policy_version:
            canary = ""  # promoted, CANARY not yet cleared: everyone gets it as the stable version
        if self._follow("canary", canary, self.engine.canary_version, self.engine.set_canary):
            self.switched_on_poll = poll
        return self.engine.policy_version

    def _follow(self, role: str, wanted: str, serving: str, switch) -> bool:
        """Load `wanted` if needed and switch the role to it; False when nothing changed or it was refused."""
        if wanted == serving:
            return False
        if role == "canary" and serving:
            # The old canary stops taking requests before its successor loads (or is refused): a new or
            # refused CANARY never leaves the version before it serving.
            self.engine.set_canary("")
        if wanted in self.refused:
            return False
        t0 = time.perf_counter()
        try:
            self._load(wanted)
            try:
                switch(wanted)
            except InvalidArgument:  # a retired version unloaded between the check and the switch: load it again
                self._load(wanted)
                switch(wanted)
        except Exception as e:  # whatever went wrong (a malformed config fails inside PEFT with a TypeError)
            self.refused.add(wanted)
            metrics.ADAPTER_SWAPS.labels("failed").inc()
            log.error("adapter refused; the old version keeps serving",
                      extra={"version": wanted, "role": role, "serving": serving, "error": str(e)})
            return False
        seconds = time.perf_counter() - t0
        metrics.ADAPTER_SWAPS.labels("ok").inc()
        metrics.ADAPTER_SWAP_SECONDS.observe(seconds)
        shown = wanted or ("(none)" if role == "canary" else "(base)")
        log.info("policy switched", extra={"version": shown, "role": role, "seconds": round(seconds, 3)})
        return True

    def _load(self, version: str) -> None:
        """Validate and load `version` unless it is resident (or the bare base)."""
        if version and version not in self.engine.loaded_versions():
            validate_adapter(self.registry.path(version), base_model=self.base_model, model=self.engine.module_tree)
            self.engine.load_adapter(version, self.registry.path(version))

    def run(self) -> None:
        """Check on every poll and whenever a pointer file was replaced, until stopped; a failing check is logged."""
        stamp, due = None, 0.0
        while not self._stop.is_set():
            try:
                seen = self.registry.pointers_stamp()
            except OSError:  # the volume is unreachable: the check will say so
                seen = None
            if seen != stamp or time.monotonic() >= due:
                # Stamped before the check: a pointer written during it is a change the next stat sees.
                stamp, due = seen, time.monotonic() + self.poll_seconds
                try:
                    self.check()
                except Exception:
                    log.exception("adapter watcher poll failed")
            self._stop.wait(self.notice_seconds or self.poll_seconds)

    def start(self) -> AdapterWatcher:
        """Poll in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="adapter-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
