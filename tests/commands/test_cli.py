"""The CLI surface: help, recipes, config validation, --print-config (through the real CLI)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llmkit.cli import COMMANDS
from llmkit.config.compose import compose, list_recipes, recipe_command, schema_keys
from llmkit.config.schema import ROOTS


def test_help_lists_every_command_quickly():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmkit", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0
    for name in ("tokenize", "pretrain", "sft", "peft", "reward", "ppo", "evaluate", "generate", "recipes"):
        assert name in done.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, llmkit.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", "importing the CLI must not import torch"
    assert elapsed < 10


def test_every_command_has_a_schema_or_says_it_is_not_built(cli):
    for name in COMMANDS:
        if name in ROOTS:
            done = cli(name, "--print-config")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip()
        else:
            done = cli(name)
            assert done.returncode == 2
            assert "not built yet" in done.stderr


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes_and_validates(recipe):
    command = recipe_command(recipe)
    assert command in ROOTS, f"recipe {recipe} must start with a '# llmkit <command> ...' line"
    typed, yaml_text = compose(command, recipe, [])
    assert type(typed) is ROOTS[command]
    assert yaml_text


def test_print_config_applies_recipe_and_overrides(cli):
    done = cli("pretrain", "tiny/pretrain", "train.max_steps=7", "--print-config")
    assert done.returncode == 0, done.stderr
    assert "max_steps: 7" in done.stdout
    assert "name: tiny" in done.stdout


def test_a_string_key_keeps_the_text_typed_where_hydra_would_read_a_bool_or_number():
    generate, _ = compose("generate", None, ["prompt=true"])
    assert generate.prompt == "true"  # OmegaConf gave 'True'
    pretrain, text = compose("pretrain", None, ["name=1e3", "out_dir=1_000", "train.max_steps=10",
                                                "tokenizer.path=null", "optim.lr=3e-4"])
    assert (pretrain.name, pretrain.out_dir) == ("1e3", "1_000")  # were '1000.0' and '1000'
    assert "name: '1e3'" in text
    assert pretrain.train.max_steps == 10 and pretrain.optim.lr == 3e-4  # numbers stay numbers
    assert pretrain.tokenizer.path is None  # null stays null


@pytest.mark.parametrize("command", ["evaluate", "ppo", "generate", "tokenize"])
def test_a_one_process_command_under_a_launch_is_refused_before_it_runs(command, monkeypatch):
    """Under torchrun each process repeated the whole job (tokenize's processes raced on one directory)."""
    from llmkit import cli
    from llmkit.errors import SettingsError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SettingsError, match=rf"`llmkit {command}` runs in one process; start it without accelerate"):
        cli._run(command, [], False)


@pytest.mark.parametrize("command", ["evaluate", "ppo", "generate"])
def test_the_launcher_on_a_one_process_command_says_which_commands_take_it(command):
    from llmkit.errors import UserError

    with pytest.raises(UserError, match=rf"`llmkit {command}` runs in one process \(launcher.num_processes is for "
                                        r"pretrain, sft, peft, reward, dpo\)"):
        compose(command, None, ["launcher.num_processes=2"])
    with pytest.raises(UserError, match=r"unknown config key 'launcher.num_process'; did you mean launcher.num_processes"):
        compose("reward", None, ["launcher.num_process=2"])  # a typo where the launcher exists


def test_recipes_listing(cli):
    done = cli("recipes")
    assert done.returncode == 0
    assert "tiny/pretrain" in done.stdout


def test_schema_surface_is_deliberate():
    """Adding or renaming a config key is a deliberate edit of this list of the basic knobs."""
    keys = set(schema_keys(ROOTS["pretrain"]))
    for key in ("out_dir", "train.max_steps", "train.seed", "train.save_every", "train.eval_every", "train.resume",
                "model.n_layer", "data.source", "optim.lr", "sched.warmup_steps", "tokenizer.vocab_size"):
        assert key in keys


def test_an_error_every_process_meets_is_printed_by_the_main_process_only(monkeypatch):
    from rich.console import Console

    from llmkit.cli import _report
    from llmkit.errors import SettingsError, UserError

    console = Console(record=True, width=200)
    monkeypatch.setenv("RANK", "1")
    assert _report(SettingsError("train.batch_size=6 must split evenly"), console) == 2
    assert console.export_text() == ""
    assert _report(UserError("no such file"), console) == 2
    assert console.export_text() == "process 1: error: no such file\n"
    monkeypatch.setenv("RANK", "0")
    assert _report(SettingsError("train.batch_size=6 must split evenly"), console) == 2
    assert console.export_text() == "error: train.batch_size=6 must split evenly\n"


def test_heldout_data_scores_only_the_documents_the_corpus_holds_out(tiny_run, cli, tmp_path):
    """heldout=data on the run's own corpus scores exactly its validation split (never its training documents);
    heldout=corpus scores every document."""

    def scores(*extra: str) -> dict:
        done = cli("evaluate", f"runs=[{tiny_run}]", f"output={tmp_path / 'eval.json'}", *extra)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / "eval.json").read_text())[0]["perplexity"]

    own = scores()
    held_out = scores("heldout=data", "data.max_documents=400")  # the tiny recipe's corpus: 400 embedded documents
    assert (held_out["tokens"], held_out["loss"]) == (own["tokens"], own["loss"])
    assert held_out["heldout"] == "embedded (held-out 0.05)"
    every = scores("heldout=corpus", "data.max_documents=400")
    assert every["tokens"] > 10 * own["tokens"] and every["heldout"] == "embedded (all documents)"


def test_evaluate_writes_each_run_its_own_results_and_never_replaces_a_run_file(tiny_run, cli, tmp_path):
    """Two runs compared: each gets its own eval.json (the first run's is not replaced by the comparison); an output=
    that is not an earlier evaluate result (a run's metrics.jsonl) is refused and left as it was."""
    for name in ("a", "b"):
        shutil.copytree(tiny_run, tmp_path / name)
    done = cli("evaluate", "runs=[a,b,a/checkpoints/step_000020]", "max_batches=1")
    assert done.returncode == 0, done.stderr
    assert "wrote a/eval.json" in done.stdout and "wrote b/eval.json" in done.stdout
    a, b = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("a", "b"))
    assert [e["run"] for e in a] == ["a", "a/checkpoints/step_000020"] and [e["run"] for e in b] == ["b"]
    history = (tmp_path / "a" / "metrics.jsonl").read_text()
    done = cli("evaluate", "runs=[a]", "max_batches=1", "output=a/metrics.jsonl")
    assert done.returncode == 2 and "a/metrics.jsonl exists and is not an earlier `llmkit evaluate` result" in done.stderr
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == history
    done = cli("evaluate", "runs=[b]", "max_batches=1", "output=a/eval.json")  # an earlier result: replaced
    assert done.returncode == 0 and [e["run"] for e in json.loads((tmp_path / "a" / "eval.json").read_text())] == ["b"]


@pytest.mark.parametrize("content", ["[]", "{}", "[1]", '[{"x": 1}]', "", "not json"])
def test_evaluate_output_that_is_not_an_earlier_result_is_refused(content, tmp_path):
    from llmkit.commands.evaluate import _refuse_to_replace
    from llmkit.errors import UserError

    path = tmp_path / "list.json"
    path.write_text(content)
    with pytest.raises(UserError, match="is not an earlier `llmkit evaluate` result"):
        _refuse_to_replace(path)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_termination_outside_a_training_loop_ends_the_command_with_a_message(signum, code, monkeypatch, capsys):
    """During set-up (tokenising, loading) SIGTERM/SIGHUP killed the process without a word and left its run
    directory; now they end it as Ctrl-C does (run directories settled, one line, 128 + the signal)."""
    import os

    import typer

    from llmkit import cli

    def signalled(*args):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        return 0

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli, "_run", signalled)
    try:
        with pytest.raises(typer.Exit) as ended:
            cli.run_command("pretrain", [], False)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert ended.value.exit_code == code
    assert f"stopped by {signal.Signals(signum).name}" in capsys.readouterr().err


@pytest.mark.parametrize("fails", [True, False])
def test_a_launched_process_destroys_its_process_group_before_the_interpreter_exits(fails, monkeypatch, tmp_path):
    """Left to interpreter shutdown, gloo's threads could free tensors after Python was gone: a process of a
    two-node launch that refused its run directory ended with SIGABRT ("terminate called without an active
    exception") instead of exit code 2, now and then."""
    import torch.distributed as dist
    import typer

    from llmkit import cli
    from llmkit.errors import SettingsError

    def launched(*args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        dist.all_gather_object([None], "ready")
        if fails:
            raise SettingsError("process(es) 1 cannot see the run directory")
        return 0

    monkeypatch.setattr(cli, "_run", launched)
    with pytest.raises(typer.Exit) as ended:
        cli.run_command("pretrain", [], False)
    assert ended.value.exit_code == (2 if fails else 0)
    assert not dist.is_initialized()
