"""Batched sampling with a KV cache, shared by the generate, evaluate and ppo commands.

Prompts of different lengths are LEFT padded so every row's next token sits in the last column;
the attention mask hides the padding and position ids are derived from the mask, so a padded row
computes exactly what it would alone. The prompt is prefilled once, then one token per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.config.schema import MIN_TEMPERATURE
from llmkit.errors import UserError
from llmkit.model.kv_cache import StaticKVCache
from llmkit.model.transformer import Transformer

OnTokens = Callable[[int, Tensor, Tensor], None]
COMPILE_LENGTH_MULTIPLE = 32  # compiled decoding: the cache length is rounded up to a multiple of this
_COMPILED_STEPS: dict[str, Callable] = {}  # per device type: torch.compile(Transformer.decode_step)


@dataclass
class GenerationResult:
    """What `generate` produced.

    tokens: (B, P + N) left-padded prompts followed by the N generated columns; after a row's eos
        it holds pad_id. attention_mask: (B, P + N) 1 for real prompt tokens and generated tokens up
        to and including eos, 0 for left padding and post-eos padding (PPO's response mask is
        attention_mask[:, prompt_len:]). Both are ordinary tensors (not inference tensors), so they can
        go straight into a training forward pass.
    new_tokens: per row, the generated ids WITHOUT the eos that stopped it.
    ended_with_eos: per row, whether generation stopped on eos (False: ran out of max_new_tokens).
    """

    tokens: Tensor
    attention_mask: Tensor
    prompt_len: int
    new_tokens: list[list[int]]
    ended_with_eos: list[bool]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids (B, T) counting only real tokens (0 at each row's first real token; pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p  # the most likely token always stays (mass_before = 0 < p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax when temperature == 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _validate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if not prompts:
        raise UserError("generate needs at least one prompt")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature != 0 and not temperature >= MIN_TEMPERATURE:
        raise UserError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] (or unset), got {top_p}")
    vocab, block = model.cfg.vocab_size, model.cfg.block_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty: generation needs at least one token to start from")
        if len(prompt) + max_new_tokens > block:
            raise UserError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(prompt) + max_new_tokens}, more than the model's context model.block_size={block}: "
                "shorten the prompt or lower max_new_tokens"
            )
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UserError(f"prompt {i} has a token id outside the vocabulary [0, {vocab})")


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    on_tokens: OnTokens | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Continue each prompt by up to max_new_tokens tokens; stop a row at eos, all rows when all are done.

    temperature 0 is greedy; otherwise logits / temperature, then top_k, then top_p filtering, then a
    draw from `generator` (same generator seed -> same samples). eos_id may be one id or several.
    on_tokens(step, new_ids (B,), finished (B,) bool) is called after each step, for streaming; rows
    already finished before the step get pad_id. Runs in inference mode and eval mode (the model's
    previous training flag is restored). compile=True runs the one-token steps through
    `torch.compile(Transformer.decode_step)` (compiled once per batch size and cache length, then reused).
    """
    _validate(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if compile and (model._forward_pre_hooks or model._forward_hooks):
        raise UserError("compiled generation does not run the model's forward hooks (prefix or prompt tuning): "
                        "generate without compile (generate: compile=false)")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens, mask, ended = _generate(
                model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, generator, on_tokens, compile
            )
    finally:
        model.train(was_training)
    tokens, mask = tokens.clone(), mask.clone()  # outside inference mode: usable in autograd later
    P = max(len(p) for p in prompts)
    new_tokens = []
    for row, (row_tokens, row_mask) in enumerate(zip(tokens[:, P:].tolist(), mask[:, P:].tolist(), strict=True)):
        kept = [t for t, m in zip(row_tokens, row_mask, strict=True) if m]
        new_tokens.append(kept[:-1] if ended[row] else kept)
    return GenerationResult(tokens, mask, P, new_tokens, ended)


def _generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | Sequence[int] | None,
    pad_id: int,
    generator: torch.Generator | None,
    on_tokens: OnTokens | None,
    compile: bool,
) -> tuple[Tensor, Tensor, list[bool]]:
    """The decoding loop; returns tokens and mask trimmed to the columns used, and the eos flags."""
    device = model.tok_emb.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    if compile:  # a cache length rounded up, so that nearby prompt lengths share one compiled step
        total = min(-(-total // COMPILE_LENGTH_MULTIPLE) * COMPILE_LENGTH_MULTIPLE, model.cfg.block_size)
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)  # (B, P + N), columns past P + N unused
    mask = torch.zeros((B, total), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) : P] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, P - len(prompt) : P] = 1
    eos = None
    if eos_id is not None:
        eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)

    cache = model.new_cache(B, total)
    positions = positions_from_mask(mask[:, :P])  # (B, P)
    # The mask matters only once some key is padding: a shorter prompt, or a row that has finished. Until then None
    # gives the model's causal fast path (the model never reads a mask's values on the host).
    masked = any(len(p) < P for p in prompts)
    hidden = model(tokens[:, :P], positions=positions, attention_mask=mask[:, :P] if masked else None, cache=cache,
                   return_hidden=True)
    logits = model.logits(hidden[:, -1])  # (B, V): only the last position is needed
    step_fn = _compiled_step(model, cache) if compile else None
    next_pos = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    step = 0
    for step in range(max_new_tokens):
        new = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        new = new.masked_fill(finished, pad_id)
        col = P + step
        tokens[:, col] = new
        mask[:, col] = (~finished).long()
        if eos is not None:
            hit = torch.isin(new, eos) & ~finished
            ended |= hit
            finished |= hit
        if on_tokens is not None:
            on_tokens(step, new.clone(), finished.clone())
        if step == max_new_tokens - 1:
            break
        if eos is not None:  # one host read per step: stop when every row has ended, mask once one has
            n_finished = int(finished.sum())
            if n_finished == B:
                break
            masked = masked or n_finished > 0
        if step_fn is not None:
            logits = step_fn(new[:, None], next_pos, mask)  # the whole mask: columns not written yet are 0
        else:
            hidden = model(new[:, None], positions=next_pos, attention_mask=mask[:, : col + 1] if masked else None,
                           cache=cache, return_hidden=True)
            logits = model.logits(hidden[:, -1])
        next_pos = next_pos + 1
    used = P + step + 1
    return tokens[:, :used], mask[:, :used], ended.tolist()


def _compiled_step(model: Transformer, cache) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """step(tokens (B, 1), positions (B, 1), mask (B, max_len)) -> logits (B, V) through a compiled decode_step.

    One compiled function per device type, taking the model as an argument (it holds no model alive); dynamo
    keeps what it compiled per model, batch size and cache length, so later calls with the same ones reuse it.
    The first call compiles (seconds; inductor needs a C++ compiler on CPU): its failure is a UserError.
    On CPU the generated code is called from C++ (inductor's cpp_wrapper), not from Python.
    """
    device_type = model.tok_emb.weight.device.type
    compiled = _COMPILED_STEPS.get(device_type)
    if compiled is None:
        options = {"cpp_wrapper": True} if device_type == "cpu" else None
        compiled = torch.compile(Transformer.decode_step, dynamic=False, fullgraph=True, options=options)
        _COMPILED_STEPS[device_type] = compiled
    static = StaticKVCache(cache)
    run, first = compiled, True

    def step(tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        nonlocal run, first
        if first:
            first = False
            try:
                logits = run(model, tokens, positions, mask, static)
            except Exception as error:  # noqa: BLE001 - a compiler missing or failing: say so, without a traceback
                if type(error).__name__ != "FailOnRecompileLimitHit":
                    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
                    raise UserError(f"torch.compile of the decode step failed ({reason}); generate without compile "
                                    "(generate: compile=false)") from error
                warnings.warn("the compiled decode step reached torch._dynamo's recompile limit (too many batch sizes, "
                              "lengths or models in this process): this call decodes without compiling",
                              RuntimeWarning, stacklevel=2)
                run = Transformer.decode_step  # the same function, run eagerly: the same tokens
                logits = run(model, tokens, positions, mask, static)
        else:  # the same tensors and shapes as the first call, which checked the guards: skip them (~0.1 ms)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = run(model, tokens, positions, mask, static)
        static.advance()
        return logits

    return step
