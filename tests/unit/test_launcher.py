"""llmkit's own launcher (`launcher.num_processes=N`) when a worker fails: the others are stopped, and the one
that caused it is named when it could not say so itself (killed by a signal)."""

import signal
import subprocess
import sys

from llmkit.cli import _lost_peer
from llmkit.launcher import _wait


def worker(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import os, signal, sys, time\n{code}"])


def test_a_killed_worker_is_named_and_the_others_are_stopped(capfd):
    rank0 = worker("time.sleep(60)")  # would run on: the launcher stops it
    rank1 = worker("time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)")
    assert _wait([rank0, rank1]) == 137
    assert rank0.returncode == -signal.SIGTERM
    assert capfd.readouterr().err.strip() == ("error: process 1 was killed by SIGKILL (out of memory? the kernel's "
                                              "OOM killer sends it); the others were stopped")


def test_the_first_failure_decides_the_exit_code_even_when_it_ends_last(capfd):
    """Rank 0 fails as its peer is killed (a lost connection): the killed rank 1 is the cause, whatever the order."""
    rank0 = worker("time.sleep(0.6); sys.exit(1)")
    rank1 = worker("time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)")
    assert _wait([rank0, rank1]) == 137 and "process 1 was killed by SIGKILL" in capfd.readouterr().err
    ok, stopped = worker("sys.exit(0)"), worker("time.sleep(0.2); sys.exit(143)")
    assert _wait([ok, stopped]) == 0 and capfd.readouterr().err == ""  # graceful codes: rank 0's
    failed, fine = worker("time.sleep(0.2); sys.exit(2)"), worker("sys.exit(0)")
    assert _wait([failed, fine]) == 2 and capfd.readouterr().err == ""  # it printed its own message


def test_a_refused_input_decides_the_exit_code_over_a_peer_that_lost_it_first(capfd):
    """Rank 0 refuses the input (2) and leaves; rank 1's collective fails (1) and is reaped first: the launch
    exited 1 where the message said the input was refused."""
    rank0, rank1 = worker("time.sleep(0.4); sys.exit(2)"), worker("time.sleep(0.1); sys.exit(1)")
    assert _wait([rank0, rank1]) == 2 and capfd.readouterr().err == ""
    crashed, waiting = worker("time.sleep(0.1); sys.exit(1)"), worker("time.sleep(60)")
    assert _wait([crashed, waiting]) == 1 and waiting.returncode == -signal.SIGTERM  # stopped, not counted


def test_lost_peer_errors_are_told_apart_from_a_process_own_failure():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:45988. This is "
                        "typically caused by a remote worker crashing.")
    assert _lost_peer(gloo) and _lost_peer(RuntimeError("Connection reset by peer"))
    assert not _lost_peer(RuntimeError("CUDA out of memory")) and not _lost_peer(ValueError("bad"))

