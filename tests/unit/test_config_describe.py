"""--print-config documents every key from the schema's own comments, and the comments never change the YAML."""

import dataclasses

import pytest
import yaml

from llmkit.config.compose import compose
from llmkit.config.describe import _child_type, annotated_yaml, field_comments
from llmkit.config.schema import ROOTS


def undocumented(root: type) -> list[str]:
    missing: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            child = _child_type(cls, f.name)
            if child is not None:
                walk(child, f"{prefix}{f.name}.")
            elif f.name not in field_comments(cls):
                missing.append(prefix + f.name)

    walk(root, "")
    return missing


@pytest.mark.parametrize("command", sorted(ROOTS))
def test_every_key_of_every_command_is_documented_and_printed_with_its_meaning(command):
    assert undocumented(ROOTS[command]) == []
    _, text = compose(command, None, [])
    annotated = annotated_yaml(text, ROOTS[command])
    assert yaml.safe_load(annotated) == yaml.safe_load(text)
    keys = [line for line in annotated.splitlines() if not line.lstrip().startswith("-") and line.endswith(":") is False]
    assert all("  # " in line for line in keys), [line for line in keys if "  # " not in line][:5]


def test_comments_come_from_the_field_line_the_lines_below_or_the_block_above():
    from llmkit.config.schema import TrainConfig
    from llmkit.peft.config import PeftConfig

    comments = field_comments(TrainConfig)
    assert comments["compile"].startswith("true | false | auto")  # inline, not the implementation note above
    assert comments["seq_len"] == "None: the model's context (model.block_size)"
    assert field_comments(PeftConfig)["targets"].startswith("Linear layers the method is placed on")  # block above


def test_a_multi_line_value_holding_key_lines_is_left_as_it_is():
    _, text = compose("generate", None, ["chat_template='{{ x }}\nmax_new_tokens: 3\nseed: 1'"])
    annotated = annotated_yaml(text, ROOTS["generate"])
    assert yaml.safe_load(annotated) == yaml.safe_load(text)
    assert "max_new_tokens: 64  # " in annotated
