"""Graceful stop on SIGINT/SIGTERM/SIGHUP or a closed standard output: only a flag is set; the loop saves and exits."""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import TextIO


def _say(text: str) -> None:
    """Write to stderr from a signal handler; a closed terminal (SIGHUP) must not raise mid-step."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class GracefulStop:
    """Install handlers for the lifetime of a `with` block.

    First signal: remember it (the loop finishes its step, checkpoints, exits 130/143/129). A closed standard output
    (`| head`, see ClosedStdoutStops) is a request too (exit 141).
    Second SIGINT: exit at once, without touching the last complete checkpoint. A SIGINT within a second of
    the first is the same request passed on twice (a terminal's Ctrl-C reaches every process of a launch, and
    torchrun / accelerate launch, or llmkit's own launcher, pass theirs on too), so it does not count.
    In a run of several processes only the main one (RANK 0) prints.
    """

    SAME_REQUEST_S = 1.0

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
    active: GracefulStop | None = None  # the innermost `with` block, for ClosedStdoutStops

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
        return 141 if self.signum == signal.SIGPIPE else self.EXIT_CODES.get(self.signum, 1)

    @property
    def name(self) -> str:
        if self.signum == signal.SIGPIPE:
            return "a closed standard output"
        return signal.Signals(self.signum).name if self.signum else ""

    def stdout_closed(self) -> None:
        """The reader of stdout went away: stop as for SIGTERM (the step's lines go nowhere from now on)."""
        if self.signum is None:
            self.signum, self.received_at = signal.SIGPIPE, time.monotonic()
            if not self.quiet:
                _say("\nstandard output was closed: finishing this step and saving a checkpoint\n")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if signum == signal.SIGINT and now - self.received_at > self.SAME_REQUEST_S:
                if not self.quiet:
                    _say("\nsecond interrupt: exiting now; the last complete checkpoint is untouched\n")
                os._exit(130)
            return
        self.signum, self.received_at = signum, now
        if not self.quiet:
            again = "" if signum == signal.SIGHUP else " (Ctrl-C again to quit at once)"  # SIGHUP: no terminal left
            _say(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint{again}\n")

    def __enter__(self) -> GracefulStop:
        for signum in self.EXIT_CODES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        self._outer, GracefulStop.active = GracefulStop.active, self
        return self

    def __exit__(self, *exc: object) -> None:
        GracefulStop.active = self._outer
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Terminated(BaseException):
    """SIGTERM or SIGHUP outside a training loop (during set-up, generate, evaluate): the command ends as after
    Ctrl-C, cleaning up what it started (a BaseException, as KeyboardInterrupt, so no `except Exception` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def terminate_outside_loops() -> None:
    """SIGTERM and SIGHUP raise Terminated in the main thread; a training loop's GracefulStop takes them over for its
    lifetime (and gives them back)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main thread
            pass


class StdoutClosed(Exception):
    """Standard output was closed outside a training loop: the command ends quietly (exit 141, as after SIGPIPE)."""


class ClosedStdoutStops:
    """sys.stdout's stand-in: once its reader has gone (BrokenPipeError), output goes to /dev/null and the running
    training loop stops gracefully (checkpoint, then exit 141); outside one, StdoutClosed ends the command."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._closed = stream, False

    def _call(self, method: str, *args):
        if self._closed:
            return len(args[0]) if method == "write" else None
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            self._closed = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())  # nothing is flushed into the broken pipe at exit
                os.close(devnull)
            except (OSError, ValueError):
                pass
            if GracefulStop.active is None:
                raise StdoutClosed() from None
            GracefulStop.active.stdout_closed()
            return len(args[0]) if method == "write" else None

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_stdout() -> None:
    """Install ClosedStdoutStops over sys.stdout (once)."""
    if not isinstance(sys.stdout, ClosedStdoutStops):
        sys.stdout = ClosedStdoutStops(sys.stdout)
