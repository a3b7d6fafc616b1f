"""Run directories: one per run, holding its resolved config, metrics and checkpoints."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llmkit.errors import UserError
from llmkit.train.checkpoint import (
    latest_checkpoint,
    read_meta,
    replaced_run,
    resolve_checkpoint,
    write_text_atomic,
)

# Keys that may change when resuming: they leave what the run computed up to now as it was (train.max_steps reshapes
# a decaying schedule from the resumed step on, and the message says so; device, compile and activation
# checkpointing compute the same things, possibly with other rounding in the last bits).
RESUMABLE_CHANGES = (
    "out_dir", "name", "logger.", "train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
    "train.log_every", "train.resume", "train.overwrite", "train.early_stopping_patience", "train.on_nonfinite",
    "train.max_nonfinite_skips", "train.device", "train.compile", "train.prefetch", "train.activation_checkpointing",
    "merge",
)
CHECKPOINT_KEYS = ("init_from", "value_from", "reward.model")  # may be respelled on resume if they name the same one


def default_out_dir(command: str, name: str | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / command
    path = base / (name or stamp)
    suffix = 1
    while name is None and path.exists():
        suffix += 1
        path = base / f"{stamp}-{suffix}"
    return path


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old_yaml: str, new_yaml: str, command: str | None = None) -> tuple[list[str], list[str]]:
    """(changes that forbid an exact resume, harmless changes), each as 'key: old -> new'. With `command`, a key
    that a later llmkit added to its schema, set to its default, is harmless: the run used what that default means."""
    from omegaconf import OmegaConf

    old = flatten(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = flatten(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    defaults = _schema_defaults(command) if command else {}
    blocking, harmless = [], []
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new[key] == defaults[key]:
            harmless.append(f"{key}: (not in the run's config) -> {new[key]!r} (added to llmkit since; its default)")
        elif old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            if key == "train.max_steps" and new.get("sched.name") not in (None, "constant"):
                line += (f" (the {new['sched.name']} learning-rate schedule now ends at step {new[key]}: the "
                         "learning rate changes from the resumed step on)")
            if key in CHECKPOINT_KEYS and _same_checkpoint(old.get(key), new.get(key)):
                harmless.append(f"{line} (the same checkpoint)")
            else:
                (harmless if key.startswith(RESUMABLE_CHANGES) else blocking).append(line)
    return blocking, harmless


def _schema_defaults(command: str) -> dict[str, Any]:
    from llmkit.config.schema import ROOTS

    return flatten(dataclasses.asdict(ROOTS[command]()))


def _same_checkpoint(old: Any, new: Any) -> bool:
    """Whether two spellings (a run, its checkpoint, a relative or absolute path) name one checkpoint now."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:
        return resolve_checkpoint(old).resolve() == resolve_checkpoint(new).resolve()
    except UserError:
        return False


def _resumable_changes(run: Path, resolved_yaml: str, resumed: Path, command: str) -> list[str]:
    """The harmless differences between `run`'s config.yaml and this run's config; UserError (naming `resumed`,
    the run or checkpoint being resumed) if any other differs."""
    blocking, harmless = config_changes((run / "config.yaml").read_text(), resolved_yaml, command)
    if blocking:
        raise UserError(f"cannot resume {resumed}: these settings differ from the saved run and would change "
                        f"its results: {'; '.join(blocking)}. Use the original values, or start a new run "
                        "(a new out_dir, without train.resume)")
    return harmless


def check_resume_source(command: str, resume: str, resolved_yaml: str) -> list[str]:
    """For `train.resume=<checkpoint>`: refuse a checkpoint that another command wrote, or whose run (when its
    config.yaml is beside it) was set up differently in ways that change the result; returns the harmless changes."""
    checkpoint = resolve_checkpoint(resume)
    written_by = read_meta(checkpoint).get("command")
    if written_by != command:
        raise UserError(f"train.resume={resume}: {checkpoint} was written by `llmkit {written_by}`, not `llmkit "
                        f"{command}`; resume from a checkpoint of a {command} run, or pass init_from={resume} to "
                        "start a new run from its weights")
    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or not (run / "config.yaml").is_file():
        return []  # a checkpoint copied out of its run: its command is all there is to check
    return _resumable_changes(run, resolved_yaml, checkpoint, command)


# What a run writes before its first training step; a directory holding nothing else stopped before training.
SETUP_FILES = ("config.yaml", "tokenizer.json")


def run_started(path: Path) -> bool:
    """Whether ``path`` holds results to keep: a logged metric, a checkpoint, anything but a run's set-up files.

    A command that failed before its first step (bad data, a shard error) leaves config.yaml, tokenizer.json, an
    empty metrics.jsonl, TensorBoard's opening event file and an empty checkpoints/: nothing to resume or keep.
    """
    metrics = path / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    for entry in path.iterdir():
        if entry.name.startswith(".") or entry.name in SETUP_FILES:
            continue
        if entry.name == "metrics.jsonl" and not logged:
            continue
        if entry.name == "tensorboard" and entry.is_dir() and not logged:
            continue
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return True
    return False


def _command_of(path: Path) -> str | None:
    """The command whose results `path` holds: its latest checkpoint's, or tokenize's shards; None if unknown."""
    checkpoint = latest_checkpoint(path / "checkpoints")
    if checkpoint is not None:
        try:
            return read_meta(checkpoint).get("command")
        except UserError:
            return None
    return "tokenize" if (path / "meta.json").is_file() and (path / "train.bin").is_file() else None


def prepare_run_dir(command: str, out_dir: str | None, name: str | None, resolved_yaml: str,
                    resume: str, overwrite: bool, is_main: bool = True) -> tuple[Path, list[str]]:
    """Create or reopen the run directory; returns (path, harmless config changes on resume).

    Refuses (UserError) an out_dir that holds a different run unless resuming or overwriting,
    a resume whose config changed in ways that cannot resume exactly, and unwritable places.
    """
    path = Path(out_dir) if out_dir else default_out_dir(command, name)
    if not is_main:  # the main process checks and writes; the others get its path (see start_run)
        return path, []
    saved = path / "config.yaml"
    _recover_replaced(path)
    explicit = resume not in ("auto", "never")
    harmless = check_resume_source(command, resume, resolved_yaml) if explicit else []
    # resuming continues the run in `path`: auto, or a checkpoint of that same run
    continues = resume == "auto" or (explicit and resolve_checkpoint(resume).resolve().is_relative_to(path.resolve()))
    started = saved.is_file() and run_started(path)
    other = _command_of(path) if started and not overwrite else None
    if other not in (None, command):
        kind = "token shards of `llmkit tokenize`" if other == "tokenize" else f"a `llmkit {other}` run"
        raise UserError(f"{path} holds {kind}, which `llmkit {command}` cannot continue; choose another out_dir= "
                        "(or train.overwrite=true to replace it)")
    if saved.is_file() and not started:
        pass  # a run that failed before training (bad data, bad settings): nothing to keep, start it afresh
    elif saved.is_file() and continues:
        harmless = sorted(set(harmless) | set(_resumable_changes(path, resolved_yaml, path, command)))
        _earlier_configs[path.resolve()] = saved.read_text()
    elif saved.is_file() and not overwrite:
        raise UserError(f"{path} already holds a run; pass train.resume=auto to continue it, "
                        "train.overwrite=true to replace it, or choose another out_dir=")
    elif path.exists() and not path.is_dir():
        raise UserError(f"out_dir={path} is a file, not a directory; choose another out_dir=")
    elif path.is_dir() and any(path.iterdir()) and not saved.is_file():
        raise UserError(f"{path} is a non-empty directory that is not an llmkit run; choose another out_dir=")
    if saved.is_file() and overwrite and not continues and run_started(path):
        _set_aside(path)
    made = _first_missing(path)  # None: the directory exists (an empty one given as out_dir, or a run's)
    empty = path.is_dir() and not any(path.iterdir())
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, resolved_yaml)
    except OSError as error:
        raise UserError(f"output directory {path} is not writable ({error.strerror}); choose another out_dir=") from None
    if made is not None or empty:
        _created[path.resolve()] = made.resolve() if made is not None else None
    return path, harmless


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (what mkdir(parents=True) makes), or None."""
    missing = None
    for part in (path, *path.parents):
        if part.exists():
            break
        missing = part
    return missing


# Undone when the command fails before its first checkpoint (settle_run_dirs): train.overwrite sets the run it
# replaces aside (checkpoint.replaced_run); a resume rewrites config.yaml with its harmless changes.
_replaced: dict[Path, Path] = {}
_earlier_configs: dict[Path, str] = {}
# Run directories this command made (with the outermost parent it made) or found empty (None): removed, or emptied,
# if it fails before logging anything.
_created: dict[Path, Path | None] = {}


def _set_aside(path: Path) -> None:
    """Move the run that train.overwrite replaces out of the way; it is deleted at the new run's first checkpoint
    and put back if the command ends before one (see settle_run_dirs)."""
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise UserError(f"train.overwrite=true would replace {path}, which holds the working directory; run from "
                        "another directory, or choose another out_dir=")
    try:
        os.replace(path, replaced_run(path))
    except OSError as error:
        raise UserError(f"cannot set {path} aside to replace it ({error.strerror}); choose another out_dir=") from None
    _replaced[path.resolve()] = replaced_run(path)


def checkpoint_saved(run_dir: Path, command: str) -> None:
    """The loops call this after each checkpoint (main process): the run that train.overwrite replaced is deleted
    at the first one, a resumed run's new config.yaml stays, and `runs/<command>/latest` points at this run."""
    _earlier_configs.pop(run_dir.resolve(), None)
    _created.pop(run_dir.resolve(), None)
    aside = _replaced.pop(run_dir.resolve(), None)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    point_latest(run_dir, command)


def settle_run_dirs(succeeded: bool) -> None:
    """At the end of a command that saved no checkpoint in a run: if it failed, a run replaced by train.overwrite
    is put back in place of the new run's files, and a resumed run gets its earlier config.yaml back (a resume
    refused after the directory was set up leaves no trace), and a run directory it created but logged nothing in is
    removed; if it succeeded, the replaced run is deleted."""
    for path, aside in _replaced.items():
        if succeeded:
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _put_back(path, aside)
    for path, text in _earlier_configs.items():
        if not succeeded and (path / "config.yaml").is_file():
            write_text_atomic(path / "config.yaml", text)
    for path, made in _created.items():  # a failed start (bad data, settings) leaves none of its set-up files
        if not succeeded and path.is_dir() and not run_started(path) and path not in _replaced:
            _remove_setup(path, made)
    _replaced.clear()
    _earlier_configs.clear()
    _created.clear()


def _remove_setup(path: Path, made: Path | None) -> None:
    """Undo a failed start in `path`: empty it again when it was given empty, else remove it and the parents made
    for it (runs/pretrain/ of a first run)."""
    if made is None:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)
    for parent in path.parents:
        if not parent.is_relative_to(made):
            break
        try:
            parent.rmdir()  # only while empty: another run may have appeared in runs/<command>/ meanwhile
        except OSError:
            break


def _put_back(path: Path, aside: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.replace(aside, path)


def _recover_replaced(path: Path) -> None:
    """Finish an overwrite that a kill interrupted: the old run comes back unless the new one saved a checkpoint."""
    aside = replaced_run(path)
    if not aside.is_dir():
        return
    if latest_checkpoint(path / "checkpoints") is not None:
        shutil.rmtree(aside)
    else:
        _put_back(path.resolve(), aside)


def point_latest(path: Path, command: str) -> None:
    """Point `runs/<command>/latest` at the run `path` (only inside a runs/<command>/ folder). The loops call it
    after each checkpoint, so `latest` names the run that saved last, never one that failed before saving."""
    path = path.resolve()  # the run itself, also when it was named through `latest`
    if path.parent.name != command:
        return
    link = path.parent / "latest"
    tmp = path.parent / ".latest.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # a filesystem without symlinks: runs are still found by path
