"""The watch's exporters: started with the watch, handed every record — on a background thread
by default, so the step never waits for a file write, a protobuf or a JSON encoding — and
closed with it.  A failing exporter is logged once and listed in ``Watch.off`` while it fails;
it never breaks the step."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

# The watch's log: these messages keep the logger name they have always had.
log = logging.getLogger(__package__ + ".watch")


class _Worker:
    """Runs the exporters on a background thread, so the step never waits for a file write,
    a protobuf or a JSON encoding: the step thread only enqueues a record builder.  A full
    queue (exporters far behind) drops the record and counts it — it never blocks the step."""

    def __init__(self, call, maxsize: int = 256):
        self._call = call
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="normkit-export", daemon=True)
        self._thread.start()

    def put(self, build) -> None:
        try:
            self._q.put_nowait(build)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("normkit exporters fall behind; dropping records (counted in "
                            "Watch.dropped_records)")

    def _run(self) -> None:
        while True:
            build = self._q.get()
            try:
                if build is None:
                    return
                self._call(build())
            except Exception:
                log.exception("normkit export worker failed on a record")
            finally:
                self._q.task_done()

    def drain(self) -> None:
        self._q.join()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=60)


class _Exports:
    """The exporters of one watch.

    Args:
        exporters: the watch's exporters (the list ``Watch.exporters``).
        switch_off: ``Watch._switch_off(what, layer, why, warn=True)``: lists an exporter as off.
        switch_on: ``Watch._switch_on(what)``: an exporter that failed works again.
    """

    def __init__(self, exporters: list, switch_off: Callable[..., None],
                 switch_on: Callable[[str], None]):
        self.exporters = exporters
        self._switch_off, self._switch_on = switch_off, switch_on
        self._exporting: list[tuple[str, Any]] = []  # (what, exporter) of those started
        self._failed: set[int] = set()
        self._worker: _Worker | None = None

    def start(self, background: bool) -> None:
        """Starts the exporters that have a ``start()``; a disabled one (``enabled`` False) or one
        whose start raises gets no records and is listed in ``off``; then the background thread
        if ``background``."""
        self._exporting = []
        for i, e in enumerate(self.exporters):
            what = f"exporter {i} ({type(e).__name__})"
            if getattr(e, "enabled", True) is False:
                self._switch_off(what, None, "disabled (enabled is False); it gets no records")
                continue
            start = getattr(e, "start", None)
            if callable(start):
                try:
                    start()
                except Exception as ex:
                    self._switch_off(what, None, f"its start() raised {type(ex).__name__}: "
                                                 f"{ex}; it gets no records")
                    continue
            self._exporting.append((what, e))
        if self._exporting and background and self._worker is None:
            self._worker = _Worker(self.export)

    def submit(self, build: Callable[[], dict], number: int) -> None:
        """Hands the record builder of step ``number`` to the exporters started (if any)."""
        if not self._exporting:
            return
        if self._worker is not None:
            self._worker.put(build)
        else:
            try:
                self.export(build())
            except Exception:
                log.exception("normkit watch failed to build the record of step %d", number)

    def export(self, record: dict) -> None:
        for what, e in self._exporting:
            try:
                e.export(record)
            except Exception as ex:
                # Log once per exporter: a dead endpoint must not flood the log every step.
                if id(e) not in self._failed:
                    self._failed.add(id(e))
                    log.exception("normkit exporter %s failed; further failures are logged at "
                                  "debug level", type(e).__name__)
                else:
                    log.debug("normkit exporter %s failed again", type(e).__name__,
                              exc_info=True)
                self._switch_off(what, None, f"its export raised {type(ex).__name__}: {ex}",
                                 warn=False)  # off while it fails; the error above says so
            else:
                self._switch_on(what)  # it recovered

    @property
    def dropped(self) -> int:
        """Records the background thread had to drop (queue full)."""
        return 0 if self._worker is None else self._worker.dropped

    def drain(self) -> None:
        """Returns once every record handed over so far is exported."""
        if self._worker is not None:
            self._worker.drain()

    def close(self) -> None:
        """Exports what is queued, stops the thread and closes every exporter."""
        if self._worker is not None:
            self._worker.close()  # drains the queue first: every record is exported
            self._worker = None
        for e in self.exporters:
            try:
                e.close()
            except Exception:
                log.exception("normkit exporter %s failed to close", type(e).__name__)
