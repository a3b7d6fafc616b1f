"""File-writing helpers shared by checkpoints, adapters and tokenizers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def match_umask(path: str | Path) -> None:
    """Give `path` the mode a plain open() would (0o666 less the umask): tempfile.mkstemp and safetensors create
    files readable by their owner only, which teammates sharing a machine could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, leaving the file with the usual mode (see match_umask)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    match_umask(path)
