"""`llmkit sft` end to end through the real CLI: learns, resumes exactly, explains a missing base."""

import json

from tests.commands.test_resume import assert_same_run, last_logged_step, start, wait_for


def sft_args(tiny_run, out):
    return ["sft", "tiny/sft", f"init_from={tiny_run}", f"out_dir={out}", "train.log_every=1",
            "logger.tensorboard=false", "train.save_every=4"]


def test_sft_loss_falls_and_run_is_chat_ready(cli, tiny_run, tmp_path):
    done = cli(*sft_args(tiny_run, tmp_path / "sft"))
    assert done.returncode == 0, done.stderr
    assert "trained on" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.2, vals
    meta = json.loads((tmp_path / "sft" / "checkpoints" / "step_000020" / "meta.json").read_text())
    assert meta["chat_template"] == "chatml" and meta["command"] == "sft"
    done = cli("generate", f"run={tmp_path / 'sft'}", "prompt=What is 2 + 3?", "sampling.max_new_tokens=8")
    assert done.returncode == 0, done.stderr


def test_sft_sigkill_then_resume_is_bit_identical(cli, cache_dir, tiny_run, tmp_path):
    reference = tmp_path / "reference"
    assert cli(*sft_args(tiny_run, reference)).returncode == 0
    run = tmp_path / "run"
    proc = start(sft_args(tiny_run, run), cache_dir, tmp_path)
    wait_for(lambda: last_logged_step(run) >= 6, proc)
    proc.kill()
    proc.wait()
    done = cli(*sft_args(tiny_run, run), "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(run, reference)


def test_sft_without_a_pretrained_run_says_how(cli):
    done = cli("sft", "tiny/sft")
    assert done.returncode == 2
    assert "llmkit pretrain" in done.stderr and "init_from=" in done.stderr
