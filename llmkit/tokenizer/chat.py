"""Chat templates (Jinja, Hugging Face ``chat_template`` semantics) and assistant-masked encoding.

A template sees ``messages`` (dicts with ``role`` and ``content``), ``bos_token``, ``eos_token`` and
``add_generation_prompt``; it is rendered in a sandbox with ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a JSON ``tojson``, as in
``transformers``. A template is a built-in name, a Jinja string, a ``.jinja`` file, or a
``tokenizer_config.json`` (or a directory holding one) with a ``chat_template`` entry.

The stop rule: **every assistant turn ends with the eos token**, and that token is trained on, so a
fine-tuned model learns to stop and generation stops at eos whatever the template. Built-ins:

``chatml``  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; an assistant turn closes
            with ``<|im_end|>`` *then* the eos token (``...<|im_end|><|endoftext|>\\n``), unless eos
            is ``<|im_end|>`` itself. Generation prompt: ``<|im_start|>assistant\\n``.
``simple``  ``System: {content}\\n``, ``User: {content}\\n``, ``Assistant: {content}{eos}\\n``.
            Generation prompt: ``Assistant:`` -- the space after the colon belongs to the answer, so
            answers tokenise as in ordinary text (`` 432``) and the model learns to emit it.

Assistant spans are found by rendering prefixes and diffing: the text of ``messages[:i]`` with the
generation prompt must be a prefix of the full rendering, and the span of assistant turn ``i`` runs
from there to just after the last eos token in the rendering of ``messages[:i+1]``. The rendering is
then tokenised piece by piece (prompt pieces and assistant pieces separately, special tokens as
single ids), so no token straddles a boundary and the prompt tokens seen in training are exactly
those :func:`encode_prompt` gives at inference. The tokenizer must not add a prefix space to each
piece (llmkit's byte-level BPE does not).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from llmkit.errors import UserError
from llmkit.tokenizer.bpe import special_tokens
from llmkit.tokenizer.config import EOS_TOKEN

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "last", "all")
IGNORE_INDEX = -100  # label of tokens not trained on (torch cross_entropy's ignore_index)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SIMPLE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n' }}"
    "{%- else %}{{- 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "simple": SIMPLE}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template has a Jinja syntax error on line {e.lineno}: {e.message}") from e


# A template read from an HF directory that uses bos_token carries the directory's bos: llmkit renders templates
# with an empty bos_token, transformers with the tokenizer's.
BOS_SETTING = "{{%- set bos_token = {} -%}}"


def token_name(value: object) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict's content."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def hf_directory_template(directory: Path) -> str | None:
    """The chat template of an HF model directory as transformers reads it (chat_template.jinja, else
    tokenizer_config.json's chat_template: a string, or the one named "default" of a list), with its bos set."""
    config_path = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8-sig")) if config_path.is_file() else {}
        jinja = directory / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8-sig") if jinja.is_file() else None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the chat template of {directory}: {e}") from e
    config = config if isinstance(config, dict) else {}
    if template is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if template and "default" not in named:
                raise UserError(f"{config_path} has chat templates named {', '.join(map(str, named))} but none named "
                                "'default', the one transformers and llmkit use: give one as a .jinja file or a "
                                "built-in name")
            template = named.get("default")
    if not isinstance(template, str) or not template:
        return None
    bos = token_name(config.get("bos_token"))
    return BOS_SETTING.format(json.dumps(bos)) + template if bos and "bos_token" in template else template


def resolve_template(template: str) -> str:
    """The Jinja source of a template given by built-in name, Jinja string, or file/directory path."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    path = Path(template).expanduser()
    if path.name == "tokenizer_config.json":
        path = path.parent
    if path.is_dir():
        found = hf_directory_template(path)
        if found is None:
            raise UserError(f"{path} has no chat template (chat_template.jinja, or a 'chat_template' string in "
                            f"tokenizer_config.json); name a built-in template ({', '.join(BUILTIN_TEMPLATES)}) instead")
        return found
    if path.is_file():
        return path.read_text(encoding="utf-8-sig")
    raise UserError(
        f"chat template {template!r} is not a built-in name ({', '.join(BUILTIN_TEMPLATES)}), a Jinja string, "
        f"a .jinja file or a tokenizer_config.json with a chat_template"
    )


def validate_messages(messages: object, location: str | None = None) -> list[dict[str, str]]:
    """Check a conversation and return it as ``[{"role", "content"}]`` (other keys dropped)."""
    where = f"{location}: " if location else ""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}messages must be a non-empty list of {{role, content}} objects, got {type(messages).__name__}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}message {i} must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"{where}message {i} has role {role!r}; roles must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise UserError(f"{where}message {i} is a system message; only the first message may be one")
        clean.append({"role": role, "content": content})
    return clean


def load_template(template: str) -> jinja2.Template:
    """A compiled template from a built-in name, Jinja string, or file/directory path."""
    return _compile(resolve_template(template))


def _render(compiled: jinja2.Template, messages: list[dict], *, add_generation_prompt: bool, eos_token: str,
            bos_token: str, location: str | None = None) -> str:
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               eos_token=eos_token, bos_token=bos_token)
    except Exception as e:  # the template is the user's code: any error in it (a TypeError too) is theirs to fix
        where = f" on {location}" if location else ""
        raise UserError(f"chat template failed{where}: {describe_template_error(e)}") from e


def describe_template_error(error: Exception) -> str:
    """A template's error for a message: its own text, or the Python error's type and text."""
    return str(error) if isinstance(error, jinja2.exceptions.TemplateError) else f"{type(error).__name__}: {error}"


def render_prompt(messages: list[dict], template: str, add_generation_prompt: bool = True, *,
                  eos_token: str = EOS_TOKEN, bos_token: str = "") -> str:
    """The rendered text of a conversation; with the generation prompt, what a model continues at inference."""
    return _render(load_template(template), validate_messages(messages), add_generation_prompt=add_generation_prompt,
                   eos_token=eos_token, bos_token=bos_token)


def _segments(messages: list[dict], compiled: jinja2.Template, eos_token: str, bos_token: str,
              add_generation_prompt: bool, location: str | None) -> list[tuple[str, bool, bool]]:
    """The full rendering cut into ``(text, is_assistant, is_last_assistant)`` pieces, in order."""

    def text(upto: int, gen: bool) -> str:
        return _render(compiled, messages[:upto], add_generation_prompt=gen, eos_token=eos_token,
                       bos_token=bos_token, location=location)

    where = f"{location}: " if location else ""
    full = text(len(messages), add_generation_prompt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = text(i, True), text(i + 1, False)
        overlaps = bool(spans) and len(before) < spans[-1][1]
        if overlaps or not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                f"{where}the chat template does not render conversations prefix by prefix (the text before assistant "
                f"message {i}, with the generation prompt, is not a prefix of the full text); use a built-in template"
            )
        end = through.rfind(eos_token, len(before))
        if end < 0:
            raise UserError(
                f"{where}the chat template does not end assistant message {i} with the eos token {eos_token!r}, so a "
                f"model would never learn to stop; add {{{{ eos_token }}}} after assistant content or use a built-in template"
            )
        spans.append((len(before), end + len(eos_token)))
    pieces, cursor = [], 0
    for k, (start, end) in enumerate(spans):
        pieces += [(full[cursor:start], False, False), (full[start:end], True, k == len(spans) - 1)]
        cursor = end
    pieces.append((full[cursor:], False, False))
    return [p for p in pieces if p[0]]


def _check_ready(tokenizer: Tokenizer, messages: list[dict], eos_token: str, location: str | None) -> int:
    """The eos id; refuses conversations whose text contains special tokens (they would be injected)."""
    where = f"{location}: " if location else ""
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise UserError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary; set tokenizer.eos_token to one of its special tokens")
    specials = list(special_tokens(tokenizer))
    for i, message in enumerate(messages):
        found = next((s for s in specials if s in message["content"]), None)
        if found:
            raise UserError(f"{where}message {i} ({message['role']}) contains the special token {found!r}; remove it from the data")
    return eos_id


def _encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool, bool]], eos_id: int,
                   location: str | None) -> list[tuple[list[int], bool, bool]]:
    encoded = []
    for text, is_assistant, is_last in pieces:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if is_assistant and (not ids or ids[-1] != eos_id):
            where = f"{location}: " if location else ""
            raise UserError(f"{where}the eos token did not encode to its single id {eos_id}; it must be a special (added) token of the tokenizer")
        encoded.append((ids, is_assistant, is_last))
    return encoded


def encode_chat(tokenizer: Tokenizer, messages: list[dict], template: str, *, eos_token: str,
                loss_on: str = "assistant", bos_token: str = "", location: str | None = None) -> tuple[list[int], list[int]]:
    """Tokenise a conversation; returns ``(input_ids, labels)`` of equal length.

    ``labels[t]`` is ``input_ids[t]`` where token t is trained on and ``IGNORE_INDEX`` elsewhere
    (not shifted: :mod:`llmkit.data.sft` shifts). ``loss_on``: ``assistant`` trains every
    assistant turn including its closing eos token, ``last`` only the last assistant turn, ``all``
    every token. Labels come from the spans, never from comparing ids with pad, so pad == eos is fine.
    """
    if loss_on not in LOSS_ON:
        raise UserError(f"loss_on={loss_on!r} is not one of {', '.join(LOSS_ON)}")
    messages = validate_messages(messages, location)
    eos_id = _check_ready(tokenizer, messages, eos_token, location)
    pieces = _segments(messages, load_template(template), eos_token, bos_token, False, location)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_assistant, is_last in _encode_pieces(tokenizer, pieces, eos_id, location):
        trained = loss_on == "all" or (is_assistant and (loss_on == "assistant" or is_last))
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_prompt(tokenizer: Tokenizer, messages: list[dict], template: str, *, eos_token: str = EOS_TOKEN,
                  bos_token: str = "") -> list[int]:
    """Token ids of :func:`render_prompt`'s text, cut into pieces exactly as :func:`encode_chat` does.

    For a conversation ending with a user turn these are the ids a fine-tuned model saw before its
    answer in training, so generation and evaluation see no tokenisation mismatch.
    """
    messages = validate_messages(messages)
    eos_id = _check_ready(tokenizer, messages, eos_token, None)
    pieces = _segments(messages, load_template(template), eos_token, bos_token, True, None)
    return [i for ids, _, _ in _encode_pieces(tokenizer, pieces, eos_id, None) for i in ids]
