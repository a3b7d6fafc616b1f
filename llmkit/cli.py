"""The `llmkit` command line: one short function per command.

Each command takes an optional recipe and Hydra overrides, composes its typed config and
hands it to `llmkit.commands.<name>.run`. Heavy imports (torch, hydra) happen only after
the command is chosen, so `llmkit --help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="llmkit: tokenize, pretrain, fine-tune, align, evaluate and sample language models from one CLI.\n\n"
    "Usage: llmkit <command> [RECIPE] key=value ...  (RECIPE: a name from `llmkit recipes` or a .yaml path; "
    "`llmkit <command> --print-config` shows every key and what it means)\n\n"
    "HF transformers model directories in and out: python -m llmkit.model.hf_io import|export ...",
)

PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

ARGS = typer.Argument(None, help="[RECIPE] then Hydra overrides: key=value (+key=value adds a key the schema has)",
                      show_default=False)
PRINT_CONFIG = typer.Option(False, "--print-config", help="Print the resolved config, every key with what it means, "
                            "and exit.")

COMMANDS = {
    "tokenize": "Train a byte-level BPE tokenizer and encode a corpus into token shards.",
    "pretrain": "Pretrain a causal language model (default: a small model on the embedded corpus).",
    "sft": "Supervised fine-tuning on instruction data with assistant-only loss.",
    "peft": "Parameter-efficient fine-tuning (LoRA and family) with a frozen base.",
    "reward": "Train a reward model on preference pairs (Bradley-Terry).",
    "ppo": "Align a policy with PPO against a reward model or rule, with a KL penalty.",
    "dpo": "Align a policy directly from preference pairs (DPO / IPO).",
    "evaluate": "Held-out loss, perplexity and bits per byte, and task suites (tasks=[...]), of runs side by side.",
    "generate": "Sample text from a run or checkpoint (temperature, top-k, top-p, stop strings).",
}


def run_command(command: str, args: list[str] | None, print_config: bool) -> None:
    """Compose the config, then run the command; user errors become one line and exit code 2."""
    from rich.console import Console

    from llmkit.train.signals import StdoutClosed, Terminated, terminate_outside_loops

    terminate_outside_loops()  # SIGTERM/SIGHUP before or after a training loop: as Ctrl-C, with a message
    console = Console(stderr=True, highlight=False)
    try:
        code = _run(command, list(args or []), print_config)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        code = 130
    except Terminated as stop:
        console.print(f"[red]stopped by {stop}[/red]")
        code = 128 + stop.signum
    except StdoutClosed:
        code = 141
    except Exception as error:
        code = _report(error, console)
    from llmkit.train.rundir import settle_run_dirs

    settle_run_dirs(succeeded=code == 0)
    _leave_process_group()
    raise typer.Exit(code)


def _run(command: str, args: list[str], print_config: bool) -> int:
    from llmkit.config.compose import compose, schema_for
    from llmkit.errors import SettingsError, UserError

    try:
        schema_for(command)
    except KeyError:
        raise UserError(f"`llmkit {command}` is not built yet in this version; see README.md for what ships") from None
    recipe = args[0] if args and "=" not in args[0] and not args[0].startswith(("~", "+")) else None
    overrides = args[1:] if recipe else args
    if recipe and recipe.startswith("-"):
        raise UserError(f"unknown option {recipe}; `llmkit {command}` takes --print-config and --help, then "
                        "[RECIPE] key=value ...")
    deleted = next((a for a in args if a.startswith("~")), None)
    if deleted is not None:
        key = deleted[1:].split("=", 1)[0]
        raise UserError(f"cannot delete {key} ({deleted}): every key of llmkit's schema is needed; set it instead "
                        f"({key}=...)")
    late = next((a for a in overrides if "=" not in a and not a.startswith(("+", "-"))), None)
    if late is not None:
        raise UserError(f"{late!r} is not key=value; a recipe goes first: llmkit {command} {late} key=value ...")
    try:
        cfg, resolved_yaml = compose(command, recipe, overrides)
    except UserError as error:
        error.same_on_every_process = True  # a launch's processes compose the same arguments: one message is enough
        raise
    if print_config:
        from llmkit.config.describe import annotated_yaml

        typer.echo(annotated_yaml(resolved_yaml, schema_for(command)), nl=False)
        return 0
    launcher = getattr(cfg, "launcher", None)
    if launcher is None and _launched():  # each process would do the whole job
        raise SettingsError(f"`llmkit {command}` runs in one process; start it without accelerate launch / torchrun")
    if launcher is not None and launcher.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(command, args, launcher.num_processes)
    module = importlib.import_module(f"llmkit.commands.{command}")  # torch loads here, after validation
    return int(module.run(cfg, resolved_yaml) or 0)


def _relaunch(command: str, args: list[str], num_processes: int) -> int:
    """Run this same command in `num_processes` processes (llmkit.launcher: gloo on CPU, NCCL on GPU)."""
    from llmkit.launcher import run_local

    return run_local([command, *args], num_processes)


def _report(error: Exception, console) -> int:
    """Print a known error as one message; unknown ones as an internal error (traceback with LLMKIT_DEBUG=1)."""
    from llmkit.errors import InterruptedRun, UserError

    if os.environ.get("LLMKIT_DEBUG") == "1":
        console.print_exception()
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f"process {rank}: "  # in a launch of several processes
    if isinstance(error, InterruptedRun):  # every process stopped at the same step: the main one says so
        if rank == "0":
            console.print(str(error), markup=False, soft_wrap=True)
        return error.exit_code
    if isinstance(error, UserError):
        if rank == "0" or not error.same_on_every_process:  # a later one may be this process's alone
            console.print(f"{where}error: {error}", style="red", markup=False, soft_wrap=True)
        return error.exit_code
    if _launched() and _lost_peer(error):  # the process that ended first says why
        if rank == "0":
            console.print("error: another process of this launch ended first (its message, or the launcher's, says why)",
                          style="red", markup=False, soft_wrap=True)
        return 1
    if isinstance(error, MemoryError):
        console.print(f"{where}error: out of memory; lower train.micro_batch_size or the model size", style="red", markup=False, soft_wrap=True)
        return 1
    console.print(f"{where}internal error: {type(error).__name__}: {error} (set LLMKIT_DEBUG=1 for the traceback)",
                  style="red", markup=False, soft_wrap=True)
    return 1


def _launched() -> bool:
    """Whether this process is one of several of a launch (torchrun, accelerate launch, launcher.num_processes)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _leave_process_group() -> None:
    """Destroy the process group of a launch while the interpreter is whole: left to interpreter shutdown, gloo's
    worker threads could free tensors after Python was gone and end the process with SIGABRT ("terminate called
    without an active exception") instead of its exit code."""
    dist = sys.modules.get("torch.distributed")  # only where the command imported it: --help stays instant
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # a peer already gone: the exit code says what happened
        pass


def _lost_peer(error: Exception) -> bool:
    """A collective or the rendezvous store failed because another process of the launch has gone."""
    names = {kind.__name__ for kind in type(error).__mro__}
    text = str(error)
    return bool(names & {"DistNetworkError", "DistStoreError"}) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _make_command(name: str, description: str):
    def command(args: list[str] | None = ARGS, print_config: bool = PRINT_CONFIG) -> None:
        run_command(name, args, print_config)

    command.__doc__ = description
    app.command(name, context_settings=PASSTHROUGH, help=description)(command)


for _name, _description in COMMANDS.items():
    _make_command(_name, _description)


@app.command("recipes")
def recipes() -> None:
    """List the recipes that ship with llmkit, with the command each is for."""
    from llmkit.config.compose import list_recipes, recipe_command

    for name in list_recipes():
        typer.echo(f"{name:40s} llmkit {recipe_command(name) or '?'} {name}")


def main() -> None:
    """Console-script entry point."""
    from llmkit.train.signals import StdoutClosed, guard_stdout

    guard_stdout()  # `llmkit ... | head`: a training run saves and stops; another command ends quietly
    try:
        app(prog_name="llmkit", args=sys.argv[1:])
    except StdoutClosed:  # `llmkit recipes | head -1`: the reader has what it wanted
        sys.exit(141)


if __name__ == "__main__":
    main()
