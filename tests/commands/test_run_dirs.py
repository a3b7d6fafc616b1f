"""Run directories and what commands accept from them, through the real CLI: PEFT runs as starting points,
resuming from another run's checkpoint, overwrite, the `latest` pointer, paths and damaged files."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from llmkit.errors import UserError
from llmkit.train.checkpoint import latest_checkpoint
from tests.commands.test_bad_input import assert_refused, copy_run, snapshot
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


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


@pytest.mark.parametrize(("args", "words"), [
    (["sft", "tiny/sft", "init_from={run}"], ["written by `llmkit pretrain`, not `llmkit sft`", "init_from="]),
    (["pretrain", "tiny/pretrain", "train.seed=5"], ["cannot resume", "train.seed: 1337 -> 5"]),
], ids=["another-command", "another-seed"])
def test_resuming_from_a_checkpoint_of_another_command_or_config_is_refused(args, words, tiny_run, cli, tmp_path):
    source = final_checkpoint(tiny_run)
    args = [a.format(run=tiny_run) for a in args]
    done = cli(*args, "out_dir=out", f"train.resume={source}", "train.max_steps=40")
    assert_refused(done, str(source), *words)
    assert not (tmp_path / "out").exists()


def test_resuming_from_another_runs_checkpoint_with_harmless_changes_continues_it(tiny_run, cli, tmp_path):
    source = final_checkpoint(tiny_run)
    step = int(source.name.split("_")[1])
    done = cli("pretrain", "tiny/pretrain", "out_dir=out", f"train.resume={source}", f"train.max_steps={step + 1}",
               "logger.tensorboard=false")
    assert done.returncode == 0, done.stderr
    assert f"resumed from {source} at step {step}" in done.stdout
    assert (tmp_path / "out" / "checkpoints" / f"step_{step + 1:06d}" / "COMPLETE").is_file()


@pytest.mark.parametrize(("setting", "words"), [("tokens_dir=no-such-dir", ["no-such-dir"]),
                                              ("train.batch_size=100000", ["fewer than one batch"])],
                         ids=["before-the-loop", "in-the-first-step"])
def test_overwrite_keeps_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(setting, words, tiny_run, cli,
                                                                                         tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    before = snapshot(run)
    done = cli("pretrain", "tiny/pretrain", f"out_dir={run}", "train.overwrite=true", setting)
    assert_refused(done, *words)
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside


def test_a_run_in_the_working_directory_and_one_named_through_latest(cli, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    done = cli("pretrain", "tiny/pretrain", "out_dir=.", "train.max_steps=2", "logger.tensorboard=false", cwd=here)
    assert done.returncode == 0, done.stderr
    assert_refused(cli("pretrain", "tiny/pretrain", "out_dir=.", "train.overwrite=true", cwd=here),
                   "holds the working directory")
    assert (here / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert cli("pretrain", "tiny/pretrain", "name=a", "train.max_steps=2", "logger.tensorboard=false").returncode == 0
    done = cli("pretrain", "tiny/pretrain", "out_dir=runs/pretrain/latest", "train.resume=auto", "train.max_steps=3",
               "logger.tensorboard=false")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "pretrain" / "latest").readlink() == Path("a")  # not a link to itself


def test_resuming_another_runs_checkpoint_into_a_directory_holding_a_run_needs_overwrite(tiny_run, cli, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, symlinks=True)
    before = snapshot(other)
    source = final_checkpoint(tiny_run)
    done = cli("pretrain", "tiny/pretrain", f"out_dir={other}", f"train.resume={source}", "train.max_steps=40")
    assert_refused(done, f"{other} already holds a run", "train.overwrite=true")
    assert snapshot(other) == before


def test_a_sft_run_resumed_after_its_init_from_moved_is_refused(tiny_run, cli, tmp_path):
    """The same init_from, but it names another run now (as runs/pretrain/latest does after a new pretrain)."""
    sft = ["sft", "tiny/sft", "out_dir=sft", "init_from=base", "logger.tensorboard=false"]
    (tmp_path / "base").symlink_to(tiny_run)
    assert cli(*sft, "train.max_steps=2").returncode == 0
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved, symlinks=True)
    (tmp_path / "base").unlink()
    (tmp_path / "base").symlink_to(moved)
    config = (tmp_path / "sft" / "config.yaml").read_text()
    done = cli(*sft, "train.resume=auto", "train.max_steps=4")
    assert_refused(done, "cannot resume", "it started from", str(moved), "the original checkpoint")
    assert (tmp_path / "sft" / "config.yaml").read_text() == config  # max_steps=4 was not written into it


def test_a_peft_run_resumed_after_its_base_was_retrained_at_the_same_path_is_refused(cli, tmp_path):
    """The same init_from and checkpoint path, other weights (train.overwrite with another seed): the frozen base
    is not in the PEFT run's checkpoints, so resuming used to train the adapter on the new base, silently."""
    base = ["pretrain", "tiny/pretrain", "out_dir=base", "train.max_steps=2", "logger.tensorboard=false"]
    peft = ["peft", "tiny/peft", "init_from=base", "out_dir=lora", "train.max_steps=2", "logger.tensorboard=false"]
    assert cli(*base).returncode == 0 and cli(*peft).returncode == 0
    assert cli(*peft, "train.resume=auto").returncode == 0  # the same base: a finished run resumes to itself
    assert cli(*base, "train.overwrite=true", "train.seed=7").returncode == 0
    before = snapshot(tmp_path / "lora")
    done = cli(*peft, "train.resume=auto")
    assert_refused(done, "cannot resume", "init_from=base", "other weights than when the run started")
    assert snapshot(tmp_path / "lora") == before


def test_a_ppo_run_resumed_after_its_reward_run_trained_further_is_refused(tiny_sft, cli, tmp_path):
    """reward.model names a run: once that run has a newer checkpoint, a resumed PPO run would be scored by it."""
    reward = ["reward", "tiny/reward", f"init_from={tiny_sft}", "out_dir=rwd", "train.save_every=2",
              "logger.tensorboard=false"]
    ppo = ["ppo", "tiny/ppo", f"init_from={tiny_sft}", "reward.model=rwd", "out_dir=ppo", "train.max_steps=1",
           "logger.tensorboard=false"]
    assert cli(*reward, "train.max_steps=2").returncode == 0
    assert cli(*ppo).returncode == 0
    assert cli(*reward, "train.max_steps=4", "train.resume=auto").returncode == 0
    done = cli(*ppo, "train.resume=auto")
    assert_refused(done, "cannot resume", "reward.model=rwd is now", "step_000004", "the original checkpoint")


def test_a_resumed_run_that_had_stopped_early_trains_no_further(tiny_run, cli, tmp_path):
    """As a finished run: re-running the command (or the resume command a late signal printed) used to train on."""
    sft = ["sft", "tiny/sft", f"init_from={tiny_run}", "out_dir=es", "optim.lr=0.3", "train.eval_every=2",
           "train.early_stopping_patience=1", "train.save_every=2", "logger.tensorboard=false"]
    done = cli(*sft)
    assert done.returncode == 0 and "early stopping at step" in done.stdout, done.stdout
    before = snapshot(tmp_path / "es")
    done = cli(*sft, "train.resume=auto")
    assert done.returncode == 0 and "stopped early at step" in done.stdout and "nothing to train" in done.stdout
    after = snapshot(tmp_path / "es")
    assert after.pop("config.yaml") != before.pop("config.yaml")  # train.resume=auto: the one change
    assert after == before  # the same checkpoints and metrics


def test_a_loader_says_where_an_interrupted_overwrite_left_the_old_run(tmp_path):
    from llmkit.train.checkpoint import resolve_checkpoint

    (tmp_path / ".run.replaced" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("the new run's set-up\n")
    with pytest.raises(UserError, match=r"interrupted train.overwrite left .*\.run\.replaced.*puts it back"):
        resolve_checkpoint(tmp_path / "run")


def test_an_overwrite_killed_before_training_is_undone_by_the_next_command(tiny_run, tmp_path):
    from llmkit.train.rundir import prepare_run_dir

    run, aside = tmp_path / "run", tmp_path / ".run.replaced"
    shutil.copytree(tiny_run, aside, symlinks=True)
    run.mkdir()
    (run / "config.yaml").write_text("the new run's set-up\n")
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir("pretrain", str(run), None, "{}", "never", False)
    assert snapshot(run) == snapshot(tiny_run) and not aside.exists()


def test_a_run_that_fails_before_its_first_checkpoint_does_not_move_latest(cli, tmp_path):
    done = cli("pretrain", "tiny/pretrain", "name=good", "train.max_steps=2", "logger.tensorboard=false")
    assert done.returncode == 0, done.stderr
    assert_refused(cli("pretrain", "tiny/pretrain", "name=bad", "tokens_dir=nope"), "nope")
    latest = tmp_path / "runs" / "pretrain" / "latest"
    assert latest.is_symlink() and latest.readlink() == Path("good")
    assert not (tmp_path / "runs" / "pretrain" / "bad").exists()  # the failed start left no directory behind


def test_a_failed_start_leaves_an_empty_out_dir_empty_and_no_parent_it_made(tmp_path):
    from llmkit.train.rundir import prepare_run_dir, settle_run_dirs

    given = tmp_path / "given"
    given.mkdir()
    path, _ = prepare_run_dir("pretrain", str(given), None, "{}", "never", False)
    (path / "tokenizer.json").write_text("{}")
    (path / "tensorboard").mkdir()
    made = tmp_path / "new" / "sub" / "run"
    (tmp_path / "new").mkdir()
    prepare_run_dir("pretrain", str(made), None, "{}", "never", False)
    settle_run_dirs(succeeded=False)
    assert given.is_dir() and not any(given.iterdir())  # a config.yaml was left in it
    assert not (tmp_path / "new" / "sub").exists() and (tmp_path / "new").is_dir()  # sub/ was left, empty

    prepare_run_dir("pretrain", str(made), None, "{}", "never", False)
    (tmp_path / "new" / "sub" / "other").mkdir()  # another run appeared beside it meanwhile: its parent stays
    settle_run_dirs(succeeded=False)
    assert not made.exists() and (tmp_path / "new" / "sub" / "other").is_dir()


def test_a_peft_run_records_its_base_as_an_absolute_path_and_loads_from_anywhere(peft_run, cli, tmp_path):
    config = json.loads((peft_run / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_info"]["checkpoint"]).is_absolute()
    done = cli("generate", f"run={peft_run}", "prompt=hi", "sampling.max_new_tokens=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def break_json(path: Path, edit) -> None:
    """Replace the JSON file `path` by edit(its object), or by `edit` itself when it is a string."""
    path.write_text(edit if isinstance(edit, str) else json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize(("where", "file", "edit", "words"), [
    ("adapter", "adapter_config.json", "{not json", ["adapter_config.json is unreadable", "corrupted"]),
    ("checkpoint", "adapter_config.json", lambda c: {k: v for k, v in c.items() if k != "base_fingerprint"},
     ["adapter_config.json lacks base_fingerprint"]),
    ("checkpoint", "meta.json", lambda m: {**m, "base": "gone/base"}, ["base model of the adapter", "gone/base",
                                                                     "relative path"]),
    ("checkpoint", "meta.json", "[1, 2]", ["meta.json", "not a JSON object"]),
], ids=["adapter-config-not-json", "adapter-config-without-fingerprint", "base-missing", "meta-not-an-object"])
def test_damaged_peft_files_are_refused_naming_the_file(where, file, edit, words, peft_run, cli, tmp_path):
    run = tmp_path / "peft"
    shutil.copytree(peft_run, run, symlinks=True)
    target = run / "adapter" if where == "adapter" else run / "checkpoints" / "step_000002"
    break_json(target / file, edit)
    assert_refused(cli("generate", f"run={target}", "prompt=hi", "sampling.max_new_tokens=2"), str(target), *words)


def test_resuming_from_a_checkpoint_without_its_rng_file_says_the_file_is_missing(tiny_run, cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    checkpoint = final_checkpoint(run)
    (checkpoint / "rng_0.pt").unlink()
    done = cli("pretrain", "tiny/pretrain", f"out_dir={run}", "train.resume=auto", "train.max_steps=40")
    assert_refused(done, f"{checkpoint / 'rng_0.pt'} is missing", "incomplete or corrupted")


def test_weights_and_tokenizers_get_the_mode_of_the_umask_not_0600(peft_run, tiny_run, tmp_path):
    from llmkit.tokenizer.bpe import load_tokenizer, save_tokenizer

    mask = os.umask(0o022)
    try:
        save_tokenizer(load_tokenizer(tiny_run / "tokenizer.json"), tmp_path)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "tokenizer.json").stat().st_mode) == 0o644
    tokens = Path(json.loads((final_checkpoint(tiny_run) / "meta.json").read_text())["tokens_dir"])
    for path in (peft_run / "adapter" / "adapter.safetensors", final_checkpoint(peft_run) / "model.safetensors",
                 tokens / "train.bin", tokens / "val.bin", tokens / "meta.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path  # the CLI ran under this process's umask


def test_what_a_resume_may_change_and_what_it_may_not():
    from llmkit.train.rundir import config_changes

    old = "train:\n  max_steps: 30\n  seed: 0\n  prefetch: true\nmerge: false\n"
    blocking, harmless = config_changes(old, "train:\n  max_steps: 60\n  seed: 0\n  prefetch: false\nmerge: true\n")
    assert blocking == [] and harmless == ["merge: False -> True", "train.max_steps: 30 -> 60", "train.prefetch: True -> False"]
    _, harmless = config_changes(old + "sched:\n  name: cosine\n",
                                 "train:\n  max_steps: 20\n  seed: 0\n  prefetch: true\nsched:\n  name: cosine\n")
    assert harmless[-1] == ("train.max_steps: 30 -> 20 (the cosine learning-rate schedule now ends at step 20: the "
                            "learning rate changes from the resumed step on)")
    blocking, _ = config_changes(old, "train:\n  max_steps: 30\n  seed: 1\nmerge: false\n")
    assert blocking == ["train.seed: 0 -> 1"]
    # a run from before a key was added (reward's launcher, the model's qkv_bias) resumes at the key's default only
    before = "train:\n  seed: 0\nmodel:\n  bias: true\n"
    added = "train:\n  seed: 0\nmodel:\n  bias: true\n  qkv_bias: {}\nlauncher:\n  num_processes: {}\n"
    blocking, harmless = config_changes(before, added.format("null", 1), "pretrain")
    assert blocking == [] and harmless == [
        "launcher.num_processes: (not in the run's config) -> 1 (added to llmkit since; its default)",
        "model.qkv_bias: (not in the run's config) -> None (added to llmkit since; its default)"]
    blocking, _ = config_changes(before, added.format("false", 2), "pretrain")
    assert blocking == ["launcher.num_processes: None -> 2", "model.qkv_bias: None -> False"]


def test_init_from_respelled_as_the_same_checkpoint_is_harmless_on_resume(tiny_run, tmp_path, monkeypatch):
    from llmkit.train.rundir import config_changes

    monkeypatch.chdir(tiny_run.parent)
    checkpoint = latest_checkpoint(tiny_run / "checkpoints")
    blocking, harmless = config_changes(f"init_from: {tiny_run.name}\n", f"init_from: {checkpoint}\n")
    assert blocking == [] and harmless == [f"init_from: {tiny_run.name!r} -> {str(checkpoint)!r} (the same checkpoint)"]
    earlier = checkpoint.parent / "step_000020"
    blocking, _ = config_changes(f"init_from: {tiny_run.name}\n", f"init_from: {earlier}\n")
    assert blocking == [f"init_from: {tiny_run.name!r} -> {str(earlier)!r}"]


def test_messages_show_a_checkpoint_relative_to_the_working_directory_when_inside_it(tmp_path, monkeypatch):
    from llmkit.commands.common import shown

    monkeypatch.chdir(tmp_path)
    assert shown(tmp_path / "runs" / "pt" / "checkpoints" / "step_000010") == "runs/pt/checkpoints/step_000010"
    assert shown(tmp_path.parent / "elsewhere") == str(tmp_path.parent / "elsewhere")


@pytest.mark.parametrize(("command", "words"), [("sft", ["runs/pretrain/latest does not exist", "`llmkit pretrain`"]),
                                                ("dpo", ["runs/sft/latest does not exist", "`llmkit sft`"])])
def test_a_fine_tuning_command_with_nothing_to_start_from_says_what_to_run(command, words, cli):
    assert_refused(cli(command, f"tiny/{command}"), *words, "init_from=")


def test_a_resume_with_max_steps_before_the_checkpoint_is_refused_and_leaves_the_run_as_it_was(tiny_run, cli, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    last = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    done = cli("pretrain", "tiny/pretrain", f"out_dir={run}", "train.resume=auto", f"train.max_steps={last - 1}")
    assert_refused(done, f"at step {last}", f"past train.max_steps={last - 1}", f"train.max_steps={last} or more")
    assert "resuming with changed settings" not in done.stdout  # refused before being reported as allowed
    assert snapshot(run) == before  # config.yaml too: the refused max_steps was not written into it


def test_a_run_that_failed_before_its_first_step_is_started_afresh_and_another_commands_run_is_named(tiny_run,
                                                                                                     tmp_path):
    """A failed start (bad data) leaves config.yaml, an empty metrics.jsonl, TensorBoard's first events file and no
    checkpoint: the corrected command starts there afresh (it was refused as holding a run, and the suggested
    resume=auto then refused the changed settings). Another command's run or a tokenize directory is refused by
    its command, not with a diff of every key."""
    from llmkit.train.rundir import prepare_run_dir

    failed = tmp_path / "failed"
    (failed / "tensorboard").mkdir(parents=True)
    (failed / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"header")
    (failed / "checkpoints").mkdir()
    (failed / "metrics.jsonl").write_text("")
    (failed / "config.yaml").write_text("data:\n  path: one.jsonl\n")
    for resume in ("never", "auto"):
        path, _ = prepare_run_dir("sft", str(failed), None, "data:\n  path: good.jsonl\n", resume, False)
        assert (path / "config.yaml").read_text() == "data:\n  path: good.jsonl\n"

    pretrain = copy_run(tiny_run, tmp_path / "pretrain")
    for resume in ("never", "auto"):
        with pytest.raises(UserError, match="holds a `llmkit pretrain` run, which `llmkit sft` cannot continue"):
            prepare_run_dir("sft", str(pretrain), None, "{}", resume, False)
    shards = tmp_path / "tokens"
    shards.mkdir()
    for name in ("config.yaml", "meta.json", "train.bin", "val.bin"):
        (shards / name).write_text("{}")
    with pytest.raises(UserError, match="holds token shards of `llmkit tokenize`"):
        prepare_run_dir("pretrain", str(shards), None, "{}", "auto", False)


def test_a_peft_run_records_the_chat_template_it_was_tuned_with(peft_run):
    """A PEFT run on instruction data renders prompts in data.chat_template from then on, run and adapter alike (it
    kept the base's: none for a pretrained base, so generate and evaluate used no template)."""
    from llmkit.commands.common import load_trained

    assert load_trained(str(peft_run)).meta["chat_template"] == "chatml"
    assert load_trained(str(peft_run / "adapter")).meta["chat_template"] == "chatml"
