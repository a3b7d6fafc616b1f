"""Typed configuration of supervised fine-tuning data (no torch import: validated before torch loads).

Records come from the tiny world (``source=tinyworld``, offline, with exact answers to score),
local files (``files``: .jsonl/.json/.csv/.parquet) or the Hugging Face hub (``hub``). Each record
is one of three formats, told apart by its fields (``format=auto``) or fixed by ``format``:

- ``messages``: ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``; the user turn is the instruction,
  followed by a blank line and the input when the input is not empty
- ``prompt_completion``: ``{"prompt", "completion"}``

The field names are configurable (``data.*_field``). A record's own system message (``system_field``
for alpaca/prompt_completion) wins over ``system_prompt``, which is added to records that have none.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.data.tinyworld import FAMILIES
from llmkit.errors import UserError
from llmkit.tokenizer.chat import LOSS_ON, load_template

SOURCES = ("tinyworld", "files", "hub")
FORMATS = ("auto", "messages", "alpaca", "prompt_completion")
ENCODING_ERRORS = ("strict", "replace")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass
class SFTDataConfig:
    """Where instruction data comes from, how records map to chat messages, and how they are tokenised."""

    source: str = "tinyworld"  # tinyworld | files | hub
    path: str | None = None  # files: training records (a file, a directory or a glob)
    validation_path: str | None = None  # files: validation records; None: hold out val_fraction of path
    format: str = "auto"  # auto | messages | alpaca | prompt_completion
    messages_field: str = "messages"  # format=messages: the list of {role, content}
    instruction_field: str = "instruction"  # format=alpaca: the instruction
    input_field: str = "input"  # format=alpaca: the optional input
    output_field: str = "output"  # format=alpaca: the answer
    prompt_field: str = "prompt"  # format=prompt_completion: the prompt
    completion_field: str = "completion"  # format=prompt_completion: the answer
    system_field: str = "system"  # alpaca/prompt_completion: a per-record system message, if present
    system_prompt: str | None = None  # system message for records without one; None: none
    chat_template: str = "chatml"  # chatml | simple | a Jinja string | a .jinja or tokenizer_config.json path
    loss_on: str = "assistant"  # assistant (every assistant turn) | last (last assistant turn) | all (every token)
    max_length: int | None = None  # input tokens per example, longer ones are cut; None: the model's context
    packing: bool = True  # pack several examples per row (block-diagonal attention) instead of padding
    tinyworld_train: int = 2000  # tinyworld: training examples
    tinyworld_validation: int = 200  # tinyworld: validation examples
    tinyworld_seed: int = 0  # tinyworld: which generated tasks
    tinyworld_families: list[str] | None = None  # None: all families (see llmkit.data.tinyworld.FAMILIES)
    hub_name: str | None = None  # hub: dataset name
    hub_config: str | None = None  # hub: dataset configuration
    hub_split: str = "train"  # hub: the split to read
    hub_validation_split: str | None = None  # None: hold out val_fraction of hub_split
    val_fraction: float = 0.05  # share of records held out (by content hash) when there is no validation set
    encoding_errors: str = "strict"  # strict | replace: what invalid UTF-8 in local files does

    def __post_init__(self) -> None:
        for key, choices in (("source", SOURCES), ("format", FORMATS), ("loss_on", LOSS_ON),
                             ("encoding_errors", ENCODING_ERRORS)):
            value = getattr(self, key)
            _check(value in choices, f"data.{key}={value!r} is not one of {', '.join(choices)}")
        _check(self.source != "files" or bool(self.path),
               "data.source=files needs data.path=<a .jsonl/.json/.csv/.parquet file, directory or glob>")
        _check(self.source != "hub" or bool(self.hub_name), "data.source=hub needs data.hub_name=<dataset name>")
        for key in ("messages_field", "instruction_field", "input_field", "output_field", "prompt_field",
                    "completion_field", "system_field"):
            _check(bool(getattr(self, key)), f"data.{key} must name a field, got an empty string")
        _check(self.max_length is None or self.max_length >= 2,
               f"data.max_length must be at least 2 tokens (or null for the model's context), got {self.max_length}")
        _check(self.tinyworld_train > 0, f"data.tinyworld_train must be positive, got {self.tinyworld_train}")
        _check(self.tinyworld_validation > 0, f"data.tinyworld_validation must be positive, got {self.tinyworld_validation}")
        if self.tinyworld_families is not None:
            unknown = [f for f in self.tinyworld_families if f not in FAMILIES]
            _check(not unknown and len(self.tinyworld_families) > 0,
                   f"data.tinyworld_families has unknown or no families {unknown}; choose from {', '.join(FAMILIES)}")
        _check(0.0 < self.val_fraction <= 0.5, f"data.val_fraction must be in (0, 0.5], got {self.val_fraction}")
        try:
            load_template(self.chat_template)
        except UserError as e:
            raise UserError(f"data.chat_template: {e}") from e
