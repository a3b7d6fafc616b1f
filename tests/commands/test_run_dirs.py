"""Run directories and what commands accept from them, through the real CLI: PEFT runs as starting points,
resuming from another run's checkpoint, overwrite, the `latest` pointer, paths and damaged files."""

from pathlib import Path

import pytest

from tests.commands.test_bad_input import assert_refused
from tests.conftest import run_llmkit


@pytest.fixture(scope="module")
def peft_run(tiny_run, cache_dir) -> Path:
    """A 2-step LoRA run on `tiny_run`, its base given relative to the working directory."""
    out = tiny_run.parent / "peft"
    done = run_llmkit(cache_dir, "peft", "tiny/peft", f"init_from={tiny_run.name}", f"out_dir={out.name}",
                      "train.max_steps=2", "logger.tensorboard=false", cwd=tiny_run.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.parametrize(("command", "start"), [("sft", "adapter"), ("peft", "run"), ("ppo", "checkpoint"),
                                                ("pretrain", "run")])
def test_a_peft_run_or_adapter_is_refused_as_a_starting_model(command, start, peft_run, cli, tmp_path):
    path = {"run": peft_run, "adapter": peft_run / "adapter",
            "checkpoint": peft_run / "checkpoints" / "step_000002"}[start]
    done = cli(command, f"tiny/{command}", f"init_from={path}", "out_dir=out", "train.max_steps=1")
    assert_refused(done, f"init_from={path}", "PEFT", "lora", "merge=true", "/merged")
    assert not (tmp_path / "out").exists()


def test_a_directory_of_checkpoints_with_a_latest_pointer_resolves_to_it(tmp_path):
    """What `llmkit peft merge=true` writes (<run>/merged/step_N + latest) is a valid init_from."""
    from llmkit.train.checkpoint import resolve_checkpoint

    step = tmp_path / "merged" / "step_000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("2\n")
    (tmp_path / "merged" / "latest").write_text("step_000002\n")
    assert resolve_checkpoint(tmp_path / "merged") == step
