"""Run an evaluation task on a model: multiple-choice log-likelihood scoring and generative scoring.

Choice tasks: every choice is a continuation of the prompt (plain text: the task's target_prefix, then the
choice, as in its shots); its score is the sum of the log-probs of its tokens only (prompt and continuation
are tokenised SEPARATELY and the ids concatenated, so a choice is scored on the same tokens whatever the
prompt ends with, and trailing spaces of a plain prompt move to the continuation, where byte-level BPE
attaches them to the next word). Requests are batched right-padded, so no attention mask is needed for a
causal model. ``accuracy`` takes the highest sum; ``accuracy_norm`` divides each sum by the choice's length
in characters (lm-eval's acc_norm: the separator not counted), which removes the bias towards short choices.

Generate tasks: batched sampling through :func:`llmkit.generate.generate` (greedy by default), the
text cut at the first special token and the task's stop strings, then scored by the task's metrics.

Chat tasks render the query through a chat template (few-shot shots as earlier turns) with
:func:`llmkit.tokenizer.chat.encode_prompt`, so the prompt ids are exactly those seen in fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmkit.errors import UserError
from llmkit.eval.examples import build_queries
from llmkit.eval.metrics import MetricValue, by_family, item_scores, summarize
from llmkit.eval.tasks import DEFAULT_METRICS, Query, TaskSpec
from llmkit.tokenizer.bpe import special_tokens


@dataclass
class TaskResult:
    """A task's scores: each metric with n and interval, per family too, and a few sample predictions."""

    task: str
    kind: str
    num_fewshot: int
    n: int
    metrics: dict[str, MetricValue]
    families: dict[str, dict[str, MetricValue]] = field(default_factory=dict)  # family -> metric -> value
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {"task": self.task, "kind": self.kind, "num_fewshot": self.num_fewshot, "n": self.n,
                "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "families": {f: {k: v.to_dict() for k, v in m.items()} for f, m in self.families.items()},
                "samples": self.samples}


# ---------------------------------------------------------------- tokenisation


def split_boundary(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing spaces/tabs to the continuation (``"A: "``, ``"4"`` -> ``"A:"``, ``" 4"``)."""
    kept = context.rstrip(" \t")
    return kept, context[len(kept):] + continuation


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of the context and of the continuation, each tokenised on its own (after :func:`split_boundary`)."""
    context, continuation = split_boundary(context, continuation)
    return (tokenizer.encode(context, add_special_tokens=False).ids,
            tokenizer.encode(continuation, add_special_tokens=False).ids)


@dataclass(frozen=True)
class Prompter:
    """Turns queries into prompt ids (plain text, or through a chat template)."""

    tokenizer: Any
    eos_id: int
    template: str | None  # None: plain text

    @property
    def eos_token(self) -> str:
        return self.tokenizer.id_to_token(self.eos_id)

    def text(self, query: Query) -> str:
        if self.template is None:
            return query.text
        from llmkit.tokenizer.chat import render_prompt

        return render_prompt(query.messages, self.template, True, eos_token=self.eos_token)

    def ids(self, query: Query) -> list[int]:
        """Prompt ids; an empty plain prompt becomes [eos] so the first token has something to follow."""
        if self.template is None:
            return self.tokenizer.encode(query.text, add_special_tokens=False).ids or [self.eos_id]
        from llmkit.tokenizer.chat import encode_prompt

        return encode_prompt(self.tokenizer, query.messages, self.template, eos_token=self.eos_token)

    def choice_requests(self, query: Query, target_prefix: str = "") -> tuple[list[tuple[list[int], list[int]]], list[str]]:
        """(context ids, continuation ids) per choice, and each continuation's text: in plain text the task's
        target_prefix and the choice (as its shots show answers, and lm-eval's target_delimiter), in a chat what the
        template renders before the answer and the answer."""
        if self.template is None:
            pairs = [encode_pair(self.tokenizer, query.text, target_prefix + choice) for choice in query.choices]
            texts = [split_boundary(query.text, target_prefix + choice)[1] for choice in query.choices]
            return [(ctx or [self.eos_id], cont) for ctx, cont in pairs], texts
        from llmkit.tokenizer.chat import render_prompt

        prompt, ids = self.text(query), self.ids(query)
        texts = []
        for choice in query.choices:
            full = render_prompt([*query.messages, {"role": "assistant", "content": choice}], self.template, False,
                                 eos_token=self.eos_token)
            rest = full[len(prompt):] if full.startswith(prompt) else ""
            if choice not in rest:
                raise UserError(f"{query.where}: the chat template does not render the answer {choice!r} right after "
                                "its generation prompt; use a built-in template (chatml, simple)")
            texts.append(rest[: rest.index(choice) + len(choice)])  # template text before the answer, then it
        return [(ids, self.tokenizer.encode(t, add_special_tokens=False).ids) for t in texts], texts


def _check_length(model: torch.nn.Module, length: int, query: Query, task: TaskSpec, what: str) -> None:
    block = getattr(getattr(model, "cfg", None), "block_size", None)
    if block is not None and length > block:
        raise UserError(f"{query.where}: {what} is {length} tokens, more than the model's context of {block} "
                        f"(task {task.name}); lower num_fewshot (now {task.num_fewshot}) or shorten the prompt")


def _device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# ---------------------------------------------------------------- multiple choice


@torch.inference_mode()
def continuation_logprobs(model: torch.nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 8, pad_id: int = 0, device: torch.device | str | None = None) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context ids, continuation ids).

    Longest requests first, right-padded batches of ``batch_size``; results in the input order.
    """
    device = _device(model, device)
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i} needs a non-empty context and continuation")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    scores = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            seqs = [list(requests[i][0]) + list(requests[i][1]) for i in rows]
            width = max(map(len, seqs)) - 1
            inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
            targets = torch.zeros((len(rows), width), dtype=torch.long)
            scored = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, (i, seq) in enumerate(zip(rows, seqs)):
                inputs[r, :len(seq) - 1] = torch.tensor(seq[:-1])
                targets[r, :len(seq) - 1] = torch.tensor(seq[1:])
                scored[r, len(requests[i][0]) - 1:len(seq) - 1] = True  # predictions of the continuation tokens
            logits = model(inputs.to(device)).float()  # (B, T, V)
            picked = logits.gather(-1, targets.to(device)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, T)
            sums = (picked * scored.to(device)).sum(-1).tolist()
            for i, value in zip(rows, sums):
                scores[i] = value
    finally:
        model.train(was_training)
    return scores


def _score_choice(model, prompter: Prompter, task: TaskSpec, queries: list[Query], batch_size: int, pad_id: int,
                  device: torch.device) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    requests, spans = [], []
    for query in queries:
        pairs, _ = prompter.choice_requests(query, task.target_prefix)
        for (ctx, cont), choice in zip(pairs, query.choices):
            if not cont:
                raise UserError(f"{query.where}: choice {choice!r} encodes to no tokens")
            _check_length(model, len(ctx) + len(cont), query, task, "the prompt with a choice")
        spans.append((len(requests), len(requests) + len(pairs)))
        requests += pairs
    logprobs = continuation_logprobs(model, requests, batch_size=batch_size, pad_id=pad_id, device=device)
    raw, norm, samples = [], [], []
    for query, (a, b) in zip(queries, spans):
        lp = np.asarray(logprobs[a:b])
        per_char = lp / np.asarray([max(len(c), 1) for c in query.choices])  # lm-eval's acc_norm: the choice's length
        pick, pick_norm = int(lp.argmax()), int(per_char.argmax())
        raw.append(float(pick == query.answer_index))
        norm.append(float(pick_norm == query.answer_index))
        samples.append({"where": query.where, "family": query.family, "prompt": prompter.text(query),
                        "choices": query.choices, "answer_index": query.answer_index, "predicted": pick,
                        "predicted_norm": pick_norm, "logprobs": [round(float(x), 4) for x in lp]})
    return {"accuracy": np.asarray(raw), "accuracy_norm": np.asarray(norm)}, samples


# ---------------------------------------------------------------- generation


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest of the stop strings."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def _score_generate(model, prompter: Prompter, task: TaskSpec, queries: list[Query], batch_size: int, pad_id: int,
                    device: torch.device) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    from llmkit.generate import generate

    gen = task.generation
    tokenizer = prompter.tokenizer
    specials = set(special_tokens(tokenizer).values()) - {pad_id}
    stop_ids = sorted(specials | {prompter.eos_id})  # any special token ends an answer
    prompts = [prompter.ids(q) for q in queries]
    for query, ids in zip(queries, prompts):
        _check_length(model, len(ids) + gen.max_new_tokens, query, task, "the prompt plus generation.max_new_tokens")
    generator = None
    if gen.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(gen.seed)
    k = gen.samples  # draw j of query i is row i * k + j
    order = sorted(range(len(prompts) * k), key=lambda r: -len(prompts[r // k]))  # similar lengths share a batch
    outputs: list[list[int]] = [[] for _ in order]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        result = generate(model, [prompts[r // k] for r in rows], max_new_tokens=gen.max_new_tokens,
                          temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, eos_id=stop_ids,
                          pad_id=pad_id, generator=generator)
        for r, ids in zip(rows, result.new_tokens):
            outputs[r] = ids
    drawn = [cut_at_stops(tokenizer.decode(ids, skip_special_tokens=True), gen.stop).strip() for ids in outputs]
    predictions = drawn[::k]  # the first draw of each query is the one shown in samples
    references = [q.references for q in queries]
    scores = {m: item_scores(m, drawn, [r for r in references for _ in range(k)]) for m in
              task.metrics or DEFAULT_METRICS[task.kind]}
    if k > 1:  # a question's score: the mean over its draws (bleu: their n-gram statistics summed)
        scores = {m: s.reshape(len(queries), k, -1).sum(axis=1) if m == "bleu" else s.reshape(len(queries), k).mean(axis=1)
                  for m, s in scores.items()}
    samples = [{"where": q.where, "family": q.family, "prompt": prompter.text(q), "prediction": p,
                "references": q.references,
                **{m: float(s[i]) for m, s in scores.items() if m != "bleu"}}
               for i, (q, p) in enumerate(zip(queries, predictions))]
    return scores, samples


# ---------------------------------------------------------------- the entry point


def run_task(model: torch.nn.Module, tokenizer: Any, task: TaskSpec, *, eos_id: int, pad_id: int,
             batch_size: int = 8, limit: int | None = None, chat_template: str | None = None,
             chat: bool | None = None, device: torch.device | str | None = None, num_samples: int | None = 5,
             confidence: float = 0.95) -> TaskResult:
    """Score ``model`` on ``task``: every metric with n and a confidence interval, per family, and samples.

    chat: render queries through a chat template (default: the task's ``chat`` key); the template is
    ``chat_template`` (the one the model was fine-tuned with) or else the task's ``chat_template``.
    limit: score only the first ``limit`` examples. device: where inputs go (default: the model's).
    num_samples: how many per-example records (prompt, prediction, references, scores) to keep; None: all.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1 (or unset), got {limit}")
    use_chat = task.chat if chat is None else chat
    template = (chat_template or task.chat_template) if use_chat else None
    if use_chat and template is None:
        raise UserError(f"task {task.name} renders prompts as a chat but no chat template was given: pass the "
                        f"model's template (chatml, simple, ...) or set chat_template in {task.path}")
    queries = build_queries(task, limit=limit, chat=use_chat)
    if not queries:
        raise UserError(f"task {task.name} has no examples to score ({task.path})")
    prompter = Prompter(tokenizer, eos_id, template)
    device = _device(model, device)
    score = _score_choice if task.kind == "choice" else _score_generate
    scores, samples = score(model, prompter, task, queries, batch_size, pad_id, device)
    metrics = task.metrics or DEFAULT_METRICS[task.kind]
    options = {"confidence": confidence, "seed": task.generation.seed}
    families: dict[str, dict[str, MetricValue]] = {}
    if task.family_field:
        labels = [q.family for q in queries]
        for metric in metrics:
            for family, value in by_family(metric, scores[metric], labels, **options).items():
                families.setdefault(family, {})[metric] = value
    return TaskResult(task.name, task.kind, task.num_fewshot, len(queries),
                      {m: summarize(m, scores[m], **options) for m in metrics}, families, samples[:num_samples])


def results_table_rows(results: Mapping[str, Sequence[TaskResult]], *,
                       families: bool = True) -> tuple[list[str], list[list[str]]]:
    """Columns and rows comparing runs side by side: one row per task, metric (and family), one column per run.

    ``results`` maps a run's name to its task results. Cells read ``0.800 [0.490, 0.943] n=10``; ``-``
    where a run lacks that task or family.
    """
    runs = list(results)
    by_run = {run: {r.task: r for r in task_results} for run, task_results in results.items()}
    tasks = list(dict.fromkeys(r.task for task_results in results.values() for r in task_results))
    rows = []
    for name in tasks:
        present = [by_run[run][name] for run in runs if name in by_run[run]]
        metrics = list(dict.fromkeys(m for r in present for m in r.metrics))
        family_names = list(dict.fromkeys(f for r in present for f in r.families)) if families else []
        for metric in metrics:
            for family in [None, *family_names]:
                cells = []
                for run in runs:
                    result = by_run[run].get(name)
                    source = (result.metrics if family is None else result.families.get(family, {})) if result else {}
                    value = source.get(metric)
                    cells.append(value.format() if value else "-")
                shots = present[0].num_fewshot
                rows.append([name if shots == 0 else f"{name} ({shots}-shot)", metric, family or "all", *cells])
    return ["task", "metric", "family", *runs], rows
