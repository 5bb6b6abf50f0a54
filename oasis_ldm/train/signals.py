"""Cooperative stop on SIGUSR2 / SIGTERM / SIGINT: finish the step, save, then exit.

A signal may land anywhere, including half-way through an optimizer step, so the handler
only records it. The loop polls `requested` between steps (all ranks agree through one
collective), writes `last.pt`, and then calls `finish()`, which hands the signal to whoever
listened before us. Under submitit that is its own handler, which makes the job
checkpointable: rank 0 requeues the job (counting timeouts against its cap) and exits.
Without a previous Python handler the process exits with the conventional 128 + signum.
The library never needs to know which scheduler, if any, sent the signal.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            print(f"[oasis-ldm] caught {signal.Signals(signum).name}: stopping after this step", flush=True)
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def finish(self) -> None:
        """Pass the recorded signal on (after `last.pt` is safe), then leave the process."""
        signum = self.signum
        previous = self._previous.get(signum)
        self.restore()
        if callable(previous):
            previous(signum, None)  # submitit: checkpoint() + requeue + exit on rank 0
        sys.exit(128 + signum)
