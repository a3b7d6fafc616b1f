"""Graceful stop on SIGINT/SIGTERM: the handler only sets a flag; the loop saves and exits."""

from __future__ import annotations

import os
import signal
from types import FrameType


class GracefulStop:
    """Install handlers for the lifetime of a `with` block.

    First signal: remember it (the loop finishes its step, checkpoints, exits 130/143).
    Second SIGINT: exit at once, without touching the last complete checkpoint.
    """

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.signum: int | None = None
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
        if self.signum is not None and signum == signal.SIGINT:
            os.write(2, b"\nsecond interrupt: exiting now; the last complete checkpoint is untouched\n")
            os._exit(130)
        self.signum = signum
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
