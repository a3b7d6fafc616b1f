"""Two processes on CPU (gloo) through `launcher.num_processes=2`: same result as one process, exact resume."""

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.commands.test_resume import assert_same_run, final_weights, last_logged_step, wait_for
from tests.conftest import cli_env

ARGS = ["pretrain", "tiny/pretrain", "train.max_steps=12", "train.save_every=4", "train.log_every=1",
        "logger.tensorboard=false"]


def test_two_processes_match_one_and_resume_after_a_kill(cli, cache_dir, tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert cli(*ARGS, f"out_dir={one}").returncode == 0
    done = cli(*ARGS, f"out_dir={two}", "launcher.num_processes=2")
    assert done.returncode == 0, done.stderr
    latest = (two / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (two / "checkpoints" / latest).glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    a, b = final_weights(one), final_weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=0, atol=1e-5)
    # Kill the whole two-process job mid-run, then resume it: identical to the uninterrupted two-process run.
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *ARGS, f"out_dir={killed}", "launcher.num_processes=2"],
                            cwd=tmp_path, env=cli_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    wait_for(lambda: last_logged_step(killed) >= 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = cli(*ARGS, f"out_dir={killed}", "launcher.num_processes=2", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(killed, two)
    assert load_file(str(killed / "checkpoints" / "step_000012" / "model.safetensors"))
