"""PPO rollouts: prompts -> sampled responses (KV cache, left padding) -> per-token log-probs and values.

Layout of a rollout (B rows, P prompt columns, N response columns): ``tokens`` (B, P + N) holds
the left-padded prompts, then the responses, then pad after each response's eos;
``response_mask`` (B, N) marks response tokens up to and including eos. The logits that score
response token t sit at column P - 1 + t, so every per-token tensor of the response is (B, N) and
read from ``[:, P - 1 : -1]``. Positions come from the attention mask, so a left-padded row
computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.config.schema_align import PromptDataConfig
from llmkit.data import tinyworld
from llmkit.data.preference import held_out
from llmkit.errors import UserError
from llmkit.generate import generate, positions_from_mask
from llmkit.rl.losses import logprobs_from_logits
from llmkit.tokenizer.bpe import special_tokens
from llmkit.tokenizer.chat import encode_prompt, validate_messages


@dataclass
class PromptItem:
    ids: list[int]  # the chat-templated prompt, ending with the generation prompt
    answer: str | None  # the known answer (rule rewards), if any
    where: str


@dataclass
class Rollout:
    """Sampled responses to a batch of prompts (see the module docstring for the layout)."""

    tokens: Tensor  # (B, P + N)
    attention_mask: Tensor  # (B, P + N): 1 on real prompt and response tokens
    prompt_len: int  # P
    response_mask: Tensor  # (B, N) bool
    ended: Tensor  # (B,) bool: stopped at eos (False: truncated at max_new_tokens)
    texts: list[str]  # each response's text, up to its first special token


# ---------------------------------------------------------------- prompts


def _file_prompts(cfg: PromptDataConfig, split: str) -> list[tuple[str, dict]]:
    from llmkit.data.sources import iter_records

    path, key = (cfg.validation_path, "data.validation_path") if split == "validation" and cfg.validation_path \
        else (cfg.path, "data.path")
    records = [(rec.where, rec.data) for rec in iter_records(
        path, [cfg.prompt_field], string_fields=[], encoding_errors=cfg.encoding_errors, path_key=key,
        field_hint="fix the records or set data.prompt_field")]
    if cfg.validation_path is None:
        records = [(w, r) for w, r in records if held_out(r, cfg.val_fraction) == (split == "validation")]
    return records


def _prompt_messages(record: dict, cfg: PromptDataConfig, where: str) -> list[dict[str, str]]:
    value = record[cfg.prompt_field]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = validate_messages(value, f"{where}: field '{cfg.prompt_field}'")
    else:
        raise UserError(f"{where}: field '{cfg.prompt_field}' must be a string or a messages list, got "
                        f"{type(value).__name__}")
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn, but it ends with {messages[-1]['role']!r}")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def load_prompts(cfg: PromptDataConfig, split: str, tokenizer, template: str, eos_token: str,
                 max_prompt_len: int) -> tuple[list[PromptItem], int]:
    """Chat-templated prompts of a split and how many were dropped as longer than max_prompt_len tokens."""
    if cfg.source == "tinyworld":
        n = cfg.tinyworld_train if split == "train" else cfg.tinyworld_validation
        raw = tinyworld.make_rl_prompts(split, n, cfg.tinyworld_seed, cfg.tinyworld_families)
        records = [(f"tinyworld {split} #{i}", {cfg.prompt_field: r["prompt"], cfg.answer_field: r["answer"]})
                   for i, r in enumerate(raw)]
    else:
        records = _file_prompts(cfg, split)
    items, dropped = [], 0
    for where, record in records:
        answer = record.get(cfg.answer_field)
        if answer is not None and not isinstance(answer, str):
            raise UserError(f"{where}: field '{cfg.answer_field}' must be a string, got {type(answer).__name__}")
        ids = encode_prompt(tokenizer, _prompt_messages(record, cfg, where), template, eos_token=eos_token)
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        items.append(PromptItem(ids, answer, where))
    return items, dropped


# ---------------------------------------------------------------- sampling and scoring


def response_text(tokenizer, ids: Sequence[int], special_ids: set[int]) -> str:
    """The text of a response up to its first special token (the chat template's end-of-turn, eos)."""
    cut = next((i for i, t in enumerate(ids) if t in special_ids), len(ids))
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=False)


def sample_rollout(policy: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   eos_id: int, pad_id: int, generator: torch.Generator, tokenizer) -> Rollout:
    """Sample one response per prompt (batched, KV cache, left padding); stops each row at eos."""
    out = generate(policy, prompts, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                   pad_id=pad_id, generator=generator)
    P = out.prompt_len
    specials = set(special_tokens(tokenizer).values())
    texts = [response_text(tokenizer, ids, specials) for ids in out.new_tokens]
    ended = torch.tensor(out.ended_with_eos, device=out.tokens.device)
    return Rollout(out.tokens, out.attention_mask, P, out.attention_mask[:, P:].bool(), ended, texts)


def policy_forward(model: torch.nn.Module, tokens: Tensor, attention_mask: Tensor, prompt_len: int,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """(log-probs (B, N) of the response tokens at `temperature`, response logits (B, N, V) already divided by it)."""
    hidden = model(tokens, positions=positions_from_mask(attention_mask), attention_mask=attention_mask,
                   return_hidden=True)  # (B, T, d)
    response_logits = model.logits(hidden[:, prompt_len - 1:-1])  # (B, N, V): position P-1+t predicts token t
    logp = logprobs_from_logits(response_logits, tokens[:, prompt_len:], temperature)  # (B, N)
    return logp, response_logits / temperature


def value_forward(model: torch.nn.Module, tokens: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Values (B, N) of the states before each response token (same columns as the log-probs)."""
    return model(tokens, attention_mask)[:, prompt_len - 1:-1]

