"""Fault tolerance through the real CLI: SIGKILL at any step, kills during saves, SIGINT/SIGTERM, config changes.

A resumed run must end bit-identical to the same run done without interruption.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli_env, run_llmkit

BASE = ["pretrain", "tiny/pretrain", "train.max_steps=24", "train.save_every=4", "train.eval_every=4",
        "train.log_every=1", "logger.tensorboard=false"]


def final_weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def curve(run: Path) -> list[tuple]:
    """The metrics that must match exactly (timing-dependent fields left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("val_loss")) for r in rows]


def assert_same_run(resumed: Path, reference: Path) -> None:
    ours, theirs = final_weights(resumed), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and (ours[name] == theirs[name]).all(), name
    assert curve(resumed) == curve(reference)


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def start(args, cache, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmkit", *args], cwd=cwd, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the kill point: " + proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_llmkit(cache_dir, *BASE, f"out_dir={out}")
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("kill_point", ["just_after_checkpoint", "just_before_next_checkpoint", "before_first_checkpoint"])
def test_sigkill_then_resume_is_bit_identical(kill_point, reference, cli, cache_dir, tmp_path):
    run = tmp_path / "run"
    proc = start([*BASE, f"out_dir={run}"], cache_dir, tmp_path)
    if kill_point == "just_after_checkpoint":
        wait_for(lambda: (run / "checkpoints" / "step_000008" / "COMPLETE").exists(), proc)
    elif kill_point == "just_before_next_checkpoint":
        wait_for(lambda: last_logged_step(run) >= 11, proc)
    else:
        wait_for(lambda: last_logged_step(run) >= 2, proc)
    proc.kill()
    proc.wait()
    done = cli(*BASE, f"out_dir={run}", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    if kill_point != "before_first_checkpoint" or (run / "checkpoints" / "step_000004").exists():
        assert "resumed from" in done.stdout
    assert_same_run(run, reference)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                              ("closed stdout", 141)])
def test_signal_saves_exits_and_resumes_exactly(signum, code, reference, cli, cache_dir, tmp_path):
    """SIGHUP is a closed terminal; a closed stdout is `llmkit pretrain | head`: both stop as SIGTERM does."""
    run = tmp_path / "run"
    proc = start([*BASE, f"out_dir={run}"], cache_dir, tmp_path)
    wait_for(lambda: last_logged_step(run) >= 6, proc)
    if signum == "closed stdout":
        proc.stdout.close()  # the next step line the run prints meets a pipe without a reader
        err = proc.stderr.read()
        proc.wait(timeout=120)
        assert "standard output was closed" in err and "stopped by a closed standard output" in err
    else:
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Resume with: llmkit" in err and "train.resume=auto" in err
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert stopped_at >= 6 and stopped_at < 24
    done = cli(*BASE, f"out_dir={run}", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(run, reference)


def test_kill_during_checkpoint_save_leaves_previous_checkpoint_valid(cli, cache_dir, tmp_path):
    """A ~6M-parameter model takes long enough to save that the kill lands inside a save."""
    run = tmp_path / "run"
    args = ["pretrain", "tiny/pretrain", "model.d_model=256", "model.n_layer=6", "model.n_head=4",
            "train.save_every=1", "train.max_steps=12", "train.batch_size=4", "train.micro_batch_size=4",
            "logger.tensorboard=false", f"out_dir={run}"]
    caught = 0
    for _ in range(3):  # a few kills, each during a save when the timing allows
        proc = start(args + (["train.resume=auto"] if (run / "config.yaml").exists() else []), cache_dir, tmp_path)
        try:
            wait_for(lambda: any((run / "checkpoints").glob(".tmp-step_*")) and
                     any((run / "checkpoints").glob("step_*")), proc, timeout=60)
            caught += 1
        except AssertionError:
            pass
        proc.kill()
        proc.wait()
        latest = (run / "checkpoints" / "latest").read_text().strip()
        assert (run / "checkpoints" / latest / "COMPLETE").is_file()
        load_file(str(run / "checkpoints" / latest / "model.safetensors"))  # loads: not torn
    assert caught >= 1
    done = cli("evaluate", f"runs=[{run}]", "max_batches=1")
    assert done.returncode == 0, done.stderr
    done = cli(*args, "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert (run / "checkpoints" / "step_000012" / "COMPLETE").is_file()


def test_resume_refuses_changes_that_break_exactness_and_allows_harmless_ones(reference, cli, tmp_path):
    before = (reference / "config.yaml").read_text()
    done = cli(*BASE, f"out_dir={reference}", "train.resume=auto", "train.batch_size=4", "train.micro_batch_size=2",
               "model.d_model=32")
    assert done.returncode == 2
    assert "train.batch_size" in done.stderr and "model.d_model" in done.stderr and "Traceback" not in done.stderr
    assert (reference / "config.yaml").read_text() == before
    done = cli(*BASE, f"out_dir={reference}")  # no resume: refuses to overwrite
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert (reference / "config.yaml").read_text() == before


def test_a_doubled_ctrl_c_is_one_request_and_keeps_the_last_good_checkpoint(cli, cache_dir, tmp_path):
    """Two SIGINTs at once (a terminal's and a launcher's) stop the run once; a Ctrl-C a second later quits at
    once (tests/unit/test_loop.py); either way the last complete checkpoint stays good."""
    run = tmp_path / "run"
    proc = start([*BASE, f"out_dir={run}"], cache_dir, tmp_path)
    wait_for(lambda: (run / "checkpoints" / "step_000004" / "COMPLETE").exists(), proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "stopped by SIGINT" in err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "COMPLETE").is_file()
    load_file(str(run / "checkpoints" / latest / "model.safetensors"))
    done = cli(*BASE, f"out_dir={run}", "train.resume=auto")
    assert done.returncode == 0, done.stderr


def test_bf16_autocast_trains_keeps_fp32_weights_and_resumes_exactly(reference, cli, cache_dir, tmp_path):
    """train.precision=bf16 (GPU's default) on the CPU: the autocast paths train like fp32, checkpoints hold the
    fp32 master weights, and a stopped run resumes bit for bit."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = [*BASE, "train.precision=bf16"]
    assert cli(*args, f"out_dir={straight}").returncode == 0
    weights = final_weights(straight)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    ours, fp32 = curve(straight), curve(reference)
    assert ours != fp32  # bf16 matmuls did run
    peaks = json.loads((cache_dir / "peak_flops.json").read_text())
    assert any(name.endswith("-bfloat16") for name in peaks), peaks  # MFU over the bf16 matmul peak
    assert ours[-1][1] < ours[0][1] and abs(ours[-1][4] - fp32[-1][4]) < 0.05, (ours[-1], fp32[-1])
    proc = start([*args, f"out_dir={stopped}"], cache_dir, tmp_path)
    wait_for(lambda: last_logged_step(stopped) >= 6, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    done = cli(*args, f"out_dir={stopped}", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(stopped, straight)
