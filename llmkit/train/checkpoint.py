"""Atomic checkpoints: safetensors weights + a weights-only training state + a completion marker.

Layout of a run directory's `checkpoints/`:
    step_000100/   model.safetensors, state.pt, rng_0.pt ..., meta.json, <extra files>, COMPLETE
    latest         text file naming the newest complete checkpoint (replaced atomically)
A checkpoint is written to `.tmp-step_N`, flushed, renamed into place, and only then does
`latest` move, so a kill at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import SettingsError, UserError
from llmkit.fileio import save_safetensors

if TYPE_CHECKING:  # torch loads in the functions that need it: `llmkit tokenize` (via rundir) never does
    import torch

COMPLETE = "COMPLETE"
WEIGHTS = "model.safetensors"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def unique_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of a state dict without later names of tensors that share storage (tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    names = []
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings), as safetensors requires."""
    return {name: state[name].detach().to("cpu").contiguous() for name in unique_names(state)}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """Main process: make a fresh temporary directory for the checkpoint of `step`."""
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any], name: str = "rng") -> None:
    """Every process: its own state, `<name>_<rank>.pt` (RNG; DeepSpeed: the optimizer shard)."""
    import torch

    torch.save(state, tmp / f"{name}_{rank}.pt")


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CUDA) RNG states, as plain data for write_rank_state."""
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state returned."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def finish_checkpoint(
    root: Path,
    tmp: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    files: dict[str, Path],
) -> Path:
    """Main process: write weights, state and meta, mark complete, rename into place, move `latest`."""
    import torch

    save_safetensors(unique_tensors(tensors), tmp / WEIGHTS)
    torch.save(train_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    for name, source in files.items():
        shutil.copyfile(source, tmp / name)
    for path in tmp.iterdir():
        _fsync_file(path)
    (tmp / COMPLETE).write_text(f"{step}\n")
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(tmp)
    final = root / step_dir_name(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it atomically
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / "latest", final.name + "\n")
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names if complete, else the newest complete one; never an incomplete one."""
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / COMPLETE).is_file():
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resume_checkpoint(resume: str, root: Path) -> Path | None:
    """The checkpoint `train.resume` names: none for "never", the latest under `root` (if any) for "auto"."""
    if resume == "never":
        return None
    return latest_checkpoint(root) if resume == "auto" else resolve_checkpoint(resume)


def refuse_other_data(source: Path, data_sha256: str | None) -> None:
    """A resumed run must go on with the data it was saved with: other data under the same settings (an edited
    corpus or data file) would not continue it. Every process checks alike (SettingsError: printed once)."""
    meta = read_meta(source)
    saved = meta.get("data_sha256")
    if saved is not None and data_sha256 is not None and saved != data_sha256:
        new_run = "a new run (a new out_dir=, without train.resume)"
        if meta.get("command") in ("pretrain", "sft", "dpo"):  # these take their own checkpoints as init_from
            new_run = f"a new run from these weights (init_from={source} out_dir=<new dir>)"
        raise SettingsError(f"cannot resume {source}: the training or validation data differ from the data it was "
                            f"trained on (the data files changed since); restore them, or train on the new data in "
                            f"{new_run}")


def weights_sha256(checkpoint: Path) -> str:
    """sha256 of a checkpoint's model.safetensors (read in 16 MiB blocks: ~1 s per 2 GB)."""
    digest = hashlib.sha256()
    with open(checkpoint / WEIGHTS, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def refuse_past_the_end(source: Path, max_steps: int, unit: str) -> None:
    """A resume whose train.max_steps lies before the checkpoint's step would leave a run past its own end."""
    reached = read_meta(source).get("step")
    if isinstance(reached, int) and reached > max_steps:
        raise SettingsError(f"{source} is at {unit} {reached}, past train.max_steps={max_steps}: give train.max_steps="
                            f"{reached} or more (more trains further), or resume from an earlier checkpoint "
                            "(train.resume=<checkpoint directory>)")


def prune_checkpoints(root: Path, keep_last: int, best: Path | None) -> None:
    """Delete old checkpoints, keeping the newest `keep_last`, the best one, and whatever `latest` names."""
    found = complete_checkpoints(root)
    keep = set(found[-keep_last:])
    latest = latest_checkpoint(root)
    keep.update(p for p in (best, latest) if p is not None)
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def replaced_run(path: Path) -> Path:
    """Where `train.overwrite` keeps the run it replaces until the new run's first checkpoint (a hidden sibling)."""
    path = path.resolve()
    return path.with_name(f".{path.name}.replaced")


def _replaced_hint(given: Path) -> str:
    aside = replaced_run(given)
    if not aside.is_dir():
        return ""
    return (f"; an interrupted train.overwrite left the run it was replacing at {aside}: the same training command "
            f"on {given} puts it back")


def _refuse_hf_directory(given: Path) -> None:
    """UserError with the import command when `given` is an HF model directory (config.json, no llmkit meta.json)."""
    if (given / "config.json").is_file() and not (given / "meta.json").is_file():
        raise UserError(f"{given} is an HF model directory (config.json), not an llmkit checkpoint: import it first, "
                        f"`python -m llmkit.model.hf_io import {given} <directory>`, then pass <directory>")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, run directory, `runs/<cmd>/latest`, a directory of checkpoints
    with a `latest` pointer (a run's `checkpoints/`, a PEFT run's `merged/`) or a weights file."""
    given = Path(path)
    if given.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        raise UserError(f"{given}: refused: weights load only from safetensors (pickle files can run code); "
                        "convert it to a .safetensors file first")
    if given.is_file() and given.suffix == ".safetensors":
        _refuse_hf_directory(given.parent)
        if not (given.parent / COMPLETE).is_file():
            _check_safetensors_header(given)
            raise UserError(f"{given}: a bare weights file cannot be loaded: llmkit needs the checkpoint directory "
                            f"around it (meta.json, tokenizer.json, {COMPLETE}); pass a run or checkpoint directory")
        given = given.parent
    if not given.exists():
        raise UserError(f"checkpoint or run {given} does not exist; train one first (e.g. `llmkit pretrain`) "
                        "or pass a run directory, a checkpoint directory, or runs/<command>/latest")
    if (given / COMPLETE).is_file():
        return given
    if (given / "checkpoints").is_dir() or given.name == "checkpoints" or (given / "latest").is_file():
        root = given / "checkpoints" if (given / "checkpoints").is_dir() else given  # a run, or its checkpoints
        found = latest_checkpoint(root)
        if found is None:
            raise UserError(f"{given} has no complete checkpoint yet (a run that stopped before its first save?)"
                            f"{_replaced_hint(given)}")
        return found
    _refuse_hf_directory(given)
    if given.is_dir() and (given / WEIGHTS).exists():
        raise UserError(f"{given} has no {COMPLETE} marker: the checkpoint was not completely written; "
                        "use an earlier checkpoint of the run")
    raise UserError(f"{given} is neither a run directory nor a checkpoint (no checkpoints/ or {COMPLETE})"
                    f"{_replaced_hint(given)}")


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's meta.json; UserError naming it when it is missing, unreadable or not an object."""
    path = checkpoint / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read checkpoint metadata ({error}); use an intact checkpoint, "
                        "e.g. an earlier one of the run") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: checkpoint metadata is not a JSON object (corrupted?); use an intact checkpoint, "
                        "e.g. an earlier one of the run")
    return meta


def _not_safetensors(path: Path, error: Exception) -> UserError:
    """The message for a file that does not parse as safetensors, saying so when it is really a pickle."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        head = b""
    pickled = len(head) == 4 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0  # PROTO n, then an opcode
    if head.startswith(b"PK\x03\x04") or pickled:  # a torch.save zip archive, or a bare pickle
        kind = "it is a pickle / torch.save file, which llmkit never loads since unpickling can run code"
        fix = "convert weights you trust with safetensors.torch.save_file"
    else:
        kind = f"truncated, corrupted, or another format: {str(error).splitlines()[0]}"
        fix = "use an intact checkpoint, e.g. an earlier one of the run"
    return UserError(f"{path}: not a valid safetensors file ({kind}); {fix}")


def _check_safetensors_header(path: Path) -> None:
    """Parse just the header of a safetensors file (never unpickling anything); UserError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _not_safetensors(path, error) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning corruption or a non-safetensors file into one clear message."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _not_safetensors(path, error) from None


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path, strict: bool = True) -> None:
    """Copy tensors into the model, listing every missing, unexpected or mis-shaped tensor on mismatch."""
    import torch

    own = model.state_dict()
    tied = set(own) - set(unique_tensors(own))
    problems = []
    for name, tensor in tensors.items():
        if name not in own:
            problems.append(f"unexpected {name} {tuple(tensor.shape)}")
        elif own[name].shape != tensor.shape:
            problems.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
    if strict:
        problems += [f"missing {n} {tuple(own[n].shape)}" for n in own if n not in tensors and n not in tied]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"{source} does not fit this model (a different architecture?): {shown}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


def load_train_state(path: Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG state, loaded with weights_only=True (never unpickling code)."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Weights only load failed" in reason:
            reason = "it holds objects other than tensors and plain data; refused, since unpickling them can run code"
        raise UserError(f"{path}: cannot load training state ({reason}); resume from another checkpoint "
                        "(train.resume=<checkpoint directory>) or start over with train.overwrite=true") from None
