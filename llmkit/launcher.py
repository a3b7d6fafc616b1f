"""`launcher.num_processes=N`: this command in N processes on this machine, started and stopped by llmkit.

Each worker gets the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT;
OMP_NUM_THREADS=1 unless set), so accelerate joins them in one process group (gloo on CPU, NCCL on GPU). The
workers share this process's process group: a Ctrl-C in the terminal reaches each of them. A SIGINT or SIGTERM
(or SIGHUP) sent to this process alone is passed on; each worker takes a duplicate within a second as the same
request (`llmkit.train.signals`). The workers agree on the step to stop at, save one checkpoint and exit
130/143/129 (141: rank 0's stdout was closed), which this process returns. When a worker fails, the others are stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACEFUL_CODES = (0, 130, 143, 129, 141)  # done, or stopped with a checkpoint (SIGINT, SIGTERM, SIGHUP, closed stdout)
FAILURE_SETTLE_S = 1.0  # after a worker failed: how long the others may end on their own (their codes count)
STOP_GRACE_S = 10.0  # then: how long the others get to exit on SIGTERM before SIGKILL


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_local(argv: list[str], num_processes: int) -> int:
    """Run `python -m llmkit <argv>` as ranks 0..num_processes-1; return rank 0's exit code (or a failure's)."""
    port = str(_free_port())
    workers = []
    for rank in range(num_processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(num_processes),
               "LOCAL_WORLD_SIZE": str(num_processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env.setdefault("OMP_NUM_THREADS", "1")
        workers.append(subprocess.Popen([sys.executable, "-m", "llmkit", *argv], env=env))

    def forward(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return _wait(workers)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(workers: list[subprocess.Popen]) -> int:
    """Wait for every worker; if one fails (not a graceful stop), stop the rest once the others that fail with it
    have ended. The exit code is the cause's: a worker killed by a signal (the OOM killer's SIGKILL) cannot say why
    it ended, so this process does; else a specific code (2: a refused input) over 1, which is also what a worker
    whose peer ended first returns."""
    failures: list[tuple[int, int]] = []  # (rank, exit code) of the workers that failed on their own, in order
    failed_at: float | None = None
    stopping = False
    while True:
        codes = [w.poll() for w in workers]
        if not stopping:
            seen = {rank for rank, _ in failures}
            failures += [(rank, code) for rank, code in enumerate(codes)
                         if code not in (None, *GRACEFUL_CODES) and rank not in seen]
            if failures and failed_at is None:
                failed_at = time.monotonic()
        if all(code is not None for code in codes):
            break
        waited = 0.0 if failed_at is None else time.monotonic() - failed_at
        if not stopping and waited > FAILURE_SETTLE_S:
            stopping = True
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        if waited > FAILURE_SETTLE_S + STOP_GRACE_S:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        time.sleep(0.05)
    if not failures:
        return codes[0]
    rank, code = min(failures, key=lambda failure: (failure[1] >= 0, failure[1] == 1))  # the earliest of equals
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
        print(f"error: process {rank} was killed by {name}{hint}; the others were stopped", file=sys.stderr)
        return 128 - code
    return code
