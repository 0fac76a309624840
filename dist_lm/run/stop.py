"""Stopping a run resumably: SIGTERM (preemption) and SIGINT (Ctrl-C) are noted, the writer
finishes its step, checkpoints and exits with Stopped (75); `--resume auto` continues it."""

from __future__ import annotations

import signal
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While installed, the first SIGTERM / SIGINT calls `noted(signum)`; a second one acts at
    once (the default handlers are back). `restore()` puts back the handlers found."""

    def __init__(self, noted: Callable[[int], None]):
        self.noted = noted
        self.previous: dict = {}

    def install(self) -> "StopSignals":
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.noted(signum)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM
                          else signal.default_int_handler)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
