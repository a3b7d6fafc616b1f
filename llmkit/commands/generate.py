"""`llmkit generate`: sample continuations of prompts, streaming a single prompt to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmkit.commands.common import load_trained, resolve_device
from llmkit.config.schema import GenerateConfig
from llmkit.errors import UserError
from llmkit.tokenizer.bpe import special_tokens

DEFAULT_PROMPT = "Return the"  # the start of many docstrings in the embedded corpus


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """Prompts from `prompts_file` (one per line), `prompts` or `prompt` (at most one is set); refusing empty ones."""
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts_file {path} does not exist")
        try:
            prompts = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise UserError(f"prompts_file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        if not prompts:
            raise UserError(f"prompts_file {path} has no prompts (one per line expected)")
        return prompts
    prompts = list(cfg.prompts) or [DEFAULT_PROMPT if cfg.prompt is None else cfg.prompt]
    if any(not p.strip() for p in prompts):
        raise UserError("give a non-empty prompt: prompt='Once upon a time', 'prompts=[a,b]' or prompts_file=<file>")
    return prompts


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    hits = [text.index(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def chat_template_for(cfg: GenerateConfig, meta: dict) -> str | None:
    """The template that wraps prompts as user turns, or None for raw text (`chat`, else the run's tuning)."""
    template = cfg.chat_template or meta.get("chat_template")
    if cfg.chat is False or (cfg.chat is None and template is None):
        return None
    return template or "chatml"


def encode_prompt(tokenizer, prompt: str, template: str | None, meta: dict) -> list[int]:
    """Token ids of a prompt: raw text (with what the tokenizer adds to a text, as HF's tokenizer(text): an imported
    Llama's bos; nothing for llmkit's tokenizers), or a user turn in `template`."""
    if template is None:
        return tokenizer.encode(prompt).ids
    from llmkit.tokenizer.chat import render_prompt

    text = render_prompt([{"role": "user", "content": prompt}], template,
                         eos_token=meta.get("eos_token", "<|endoftext|>"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def run(cfg: GenerateConfig, resolved_yaml: str) -> int:
    from llmkit.generate import generate

    prompts = read_prompts(cfg)
    loaded = load_trained(cfg.run, resolve_device(cfg.device))
    tokenizer, model, sampling = loaded.tokenizer, loaded.model, cfg.sampling
    template = chat_template_for(cfg, loaded.meta)
    encoded = [encode_prompt(tokenizer, p, template, loaded.meta) for p in prompts]
    for text, ids in zip(prompts, encoded):
        if len(ids) >= model.cfg.block_size:
            raise UserError(f"prompt {text[:40]!r}... is {len(ids)} tokens, no shorter than the model's context of "
                            f"{model.cfg.block_size}; shorten it")
    max_new = min(sampling.max_new_tokens, model.cfg.block_size - max(len(ids) for ids in encoded))
    if max_new < sampling.max_new_tokens:
        print(f"note: generating {max_new} tokens, what fits in the model's context of {model.cfg.block_size}",
              file=sys.stderr)
    eos_id = tokenizer.token_to_id(loaded.meta.get("eos_token", "<|endoftext|>"))
    pad_id = tokenizer.token_to_id(loaded.meta.get("pad_token", "<|pad|>")) or 0
    # A stop string that is a special token (<|im_end|>) never appears in the printed text: it stops as a token.
    specials = special_tokens(tokenizer)
    stop_ids = [specials[s] for s in sampling.stop if s in specials]
    stops = [s for s in sampling.stop if s not in specials]
    generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(sampling.seed)
    shown = [p + ("\n" if template else "") for p in prompts]  # a chat answer starts on its own line
    streamer = _Streamer(tokenizer, encoded[0], shown[0], stops) if cfg.stream and len(prompts) == 1 else None
    try:
        result = generate(model, encoded, max_new_tokens=max_new, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p,
                          eos_id=[i for i in (eos_id, *stop_ids) if i is not None] or None, pad_id=pad_id,
                          generator=generator, on_tokens=streamer, compile=cfg.compile)
    except KeyboardInterrupt:
        if streamer is not None:  # end the streamed line, so "interrupted" starts its own
            print(flush=True)
        raise
    if streamer is not None:
        streamer.finish()
        return 0
    for prompt, new in zip(shown, result.new_tokens):
        text, _ = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stops)
        print(f"{prompt}{text}\n{'-' * 40}")
    return 0


class _Streamer:
    """Prints a single prompt's new text as tokens arrive, holding back what could start a stop string."""

    def __init__(self, tokenizer, prompt_ids: list[int], prompt: str, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, step: int, new_ids: torch.Tensor, finished: torch.Tensor) -> None:
        if self.stopped or bool(finished[0]):
            return
        self.ids.append(int(new_ids[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next byte token
        text, self.stopped = cut_at_stop(text, self.stops)
        hold = max((len(s) - 1 for s in self.stops), default=0) if not self.stopped else 0
        end = max(self.shown, len(text) - hold)
        sys.stdout.write(text[self.shown:end])
        sys.stdout.flush()
        self.shown = end

    def finish(self) -> None:
        text, _ = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        sys.stdout.write(text[self.shown:] + "\n")
        sys.stdout.flush()
