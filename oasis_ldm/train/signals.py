"""Cooperative stop on SIGUSR2 / SIGTERM / SIGINT: finish the step, save, then exit.

A signal may land anywhere, including half-way through an optimizer step, so the handler
only records it. The loop polls `requested` between steps (all ranks agree through one
collective), writes `last.pt`, and then calls `finish()`, which hands the signal to whoever
listened before us. Under submitit that is its own handler, which makes the job
checkpointable: rank 0 requeues the job (counting timeouts against its cap) and exits.
Without a previous Python handler the process exits with the conventional 128 + signum;
a Ctrl-C exits 130 too, without the KeyboardInterrupt traceback Python's own handler
would raise through the loop. No rank leaves before every rank has handed the signal on
(see `finish`). The library never needs to know which scheduler, if any, sent the signal.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from oasis_ldm.distributed import barrier

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
        """Pass the recorded signal on (after `last.pt` is safe), wait for every rank, then exit.

        Under submitit the previous handler requeues the job on rank 0 and raises SystemExit
        there, and returns at once on the other ranks. Were those to exit now, srun under
        KillOnBadExit=1 would end the step, and its SIGTERM would reach rank 0's
        `scontrol requeue` mid-call: no requeue, the job FAILED. So every rank meets in a
        barrier once its handler is done, and only then leaves, whatever the handler raised.
        """
        signum = self.signum
        previous = self._previous.get(signum)
        self.restore()
        # Python's own SIGINT handler would raise KeyboardInterrupt through the loop: a
        # traceback after a clean save. Without it a Ctrl-C exits 130 like any shell command.
        hand_on = callable(previous) and previous is not signal.default_int_handler
        try:
            if hand_on:
                previous(signum, None)  # submitit: checkpoint() + requeue + SystemExit on rank 0
        finally:
            barrier()
        sys.exit(128 + signum)
