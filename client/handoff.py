"""A clean hand-off: stop signals that let a unit be checkpointed and returned; the background checkpoint pusher."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("isles.join")


class StopSignals:
    """SIGINT / SIGTERM set `event` (a clean hand-off follows); a second SIGINT interrupts at once."""

    def __init__(self, action: str = "checkpointing and handing the unit back"):
        self.action = action
        self.event = threading.Event()
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.info("%s received: %s (Ctrl-C again to quit at once)", self.received, self.action)
        self.event.set()


class Pusher:
    """One background worker for checkpoint uploads: at most one upload running and one waiting (the newest)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._waiting: tuple | None = None  # (push, discard)
        self._closed = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-pusher", daemon=True)
        self._thread.start()

    def submit(self, push, discard) -> None:
        with self._cv:
            if self._waiting is not None:
                self._waiting[1]()  # superseded before it started: a newer checkpoint is on its way
            self._waiting = (push, discard)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._waiting is None and not self._closed:
                    self._cv.wait()
                if self._waiting is None:
                    return
                job, self._waiting = self._waiting, None
            job[0]()

    def close(self) -> None:
        """Finish the running and the waiting upload, then stop the worker (at once after `abandon`)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            if self._abandoned:
                return
        self._thread.join()

    def abandon(self) -> None:
        """Drop the waiting upload and do not wait for the running one."""
        with self._cv:
            if self._waiting is not None:
                self._waiting[1]()
            self._waiting, self._closed, self._abandoned = None, True, True
            self._cv.notify_all()
