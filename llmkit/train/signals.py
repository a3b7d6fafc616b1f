"""Graceful stop on SIGINT/SIGTERM: the handler only sets a flag; the loop saves and exits."""

from __future__ import annotations

import os
import signal
import time
from types import FrameType


class GracefulStop:
    """Install handlers for the lifetime of a `with` block.

    First signal: remember it (the loop finishes its step, checkpoints, exits 130/143).
    Second SIGINT: exit at once, without touching the last complete checkpoint. A SIGINT within a second of
    the first is the same request passed on twice (a terminal's Ctrl-C reaches every process of a launch, and
    torchrun / accelerate launch, or llmkit's own launcher, pass theirs on too), so it does not count.
    In a run of several processes only the main one (RANK 0) prints.
    """

    SAME_REQUEST_S = 1.0

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0
        self.quiet = os.environ.get("RANK", "0") != "0"
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signum, 1)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if signum == signal.SIGINT and now - self.received_at > self.SAME_REQUEST_S:
                if not self.quiet:
                    os.write(2, b"\nsecond interrupt: exiting now; the last complete checkpoint is untouched\n")
                os._exit(130)
            return
        self.signum, self.received_at = signum, now
        if not self.quiet:
            os.write(2, f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                        f"(Ctrl-C again to quit at once)\n".encode())

    def __enter__(self) -> GracefulStop:
        for signum in self.EXIT_CODES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
