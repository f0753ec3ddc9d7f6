"""Stop requests: SIGINT/SIGTERM finish the current step instead of killing the process mid-write, so a
training loop (the trainer's, a contest's) can save its checkpoints and say how to resume."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, then: str = "saving a checkpoint") -> None:
        self.signal_name: str | None = None
        self.then = then  # what the loop does after the step, for the message
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(f"\n{self.signal_name} received: finishing this step, then {self.then} "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
