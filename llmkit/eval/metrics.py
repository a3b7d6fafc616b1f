"""Scores for model outputs, each reported with its sample count and a 95% confidence interval.

Per-example scores (a prediction against one or more references; the best reference counts):

``exact_match``    1 if the first lines match after collapsing whitespace (case kept: the tiny world's
                   ``upper`` family needs it), else 0 -- the tiny world's own :func:`score_exact`.
``f1``             SQuAD token F1: lower-cased, punctuation and articles (a/an/the) removed, bag of words.
``bleu``           corpus BLEU from ``sacrebleu`` (0-100, its default 13a tokenisation and exp
                   smoothing); per example we keep BLEU's sufficient statistics so the corpus score
                   can be resampled for an interval and split by family.
``accuracy``       multiple choice: the choice with the highest summed log-probability is right.
``accuracy_norm``  the same with log-probability divided by the choice's length in characters.

Binary metrics get a Wilson interval, the others a seeded percentile bootstrap. No torch here;
sacrebleu is imported only when BLEU is asked for.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llmkit.data.tinyworld import normalize as first_line_normalize
from llmkit.errors import UserError
from llmkit.eval.stats import bootstrap_interval, wilson_interval

GENERATE_METRICS = ("exact_match", "f1", "bleu")
CHOICE_METRICS = ("accuracy", "accuracy_norm")
BINARY_METRICS = ("exact_match", "accuracy", "accuracy_norm")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class MetricValue:
    """One score: its value, the number of examples n, and a confidence interval [low, high]."""

    name: str
    value: float
    n: int
    low: float
    high: float
    interval: str  # wilson | bootstrap

    def format(self, digits: int | None = None) -> str:
        """``0.800 [0.490, 0.943] n=10``: the value, its interval and n in one cell (BLEU: 2 decimals)."""
        digits = digits if digits is not None else 2 if self.name == "bleu" else 3
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] n={self.n}"

    def to_dict(self) -> dict:
        return asdict(self)


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("an example needs at least one reference answer")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the prediction's first line equals a reference's (whitespace collapsed), else 0.0."""
    pred = first_line_normalize(prediction)
    return float(any(pred == first_line_normalize(ref) for ref in _references(references)))


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1 against the best-matching reference."""
    pred = squad_normalize(prediction).split()
    return max(_f1(pred, squad_normalize(ref).split()) for ref in _references(references))


def _bleu_class():
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise UserError("the bleu metric needs sacrebleu: pip install sacrebleu (or drop bleu from the task's metrics)") from None
    return BLEU


def bleu_stats(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> np.ndarray:
    """Per-example BLEU sufficient statistics (n, 10): sys_len, ref_len, 4 n-gram matches, 4 n-gram totals."""
    scorer = _bleu_class()(effective_order=True)  # effective_order only changes the sentence score, not the counts
    rows = []
    for prediction, refs in zip(predictions, references, strict=True):
        s = scorer.sentence_score(prediction.strip(), _references(refs))
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 10)


def bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) of the examples whose statistics are the rows of ``stats``."""
    total = np.asarray(stats).sum(axis=0).astype(np.int64).tolist()
    score = _bleu_class().compute_bleu(correct=total[2:6], total=total[6:10], sys_len=total[0], ref_len=total[1],
                                       smooth_method="exp")
    return float(score.score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100); ``references[i]`` are the reference(s) of ``predictions[i]``."""
    return bleu_from_stats(bleu_stats(predictions, references))


def item_scores(metric: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> np.ndarray:
    """Per-example scores of a generative metric: (n,) for exact_match/f1, (n, 10) statistics for bleu."""
    if metric == "bleu":
        return bleu_stats(predictions, references)
    if metric == "exact_match":
        score = exact_match
    elif metric == "f1":
        score = token_f1
    else:
        raise ValueError(f"{metric!r} is not a generative metric ({', '.join(GENERATE_METRICS)})")
    return np.asarray([score(p, r) for p, r in zip(predictions, references, strict=True)], dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean())


def summarize(metric: str, scores: np.ndarray, *, confidence: float = 0.95, seed: int = 0,
              n_resamples: int = 1000) -> MetricValue:
    """The metric's value over per-example ``scores`` with n and an interval (Wilson or bootstrap)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n == 0:
        return MetricValue(metric, float("nan"), 0, float("nan"), float("nan"), "none")
    if metric in BINARY_METRICS and np.all((scores == 0) | (scores == 1)):  # else means over several draws
        hits = int(round(scores.sum()))
        low, high = wilson_interval(hits, n, confidence)
        return MetricValue(metric, hits / n, n, low, high, "wilson")
    statistic = bleu_from_stats if metric == "bleu" else _mean
    low, high = bootstrap_interval(scores, statistic, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return MetricValue(metric, statistic(scores), n, low, high, "bootstrap")


def by_family(metric: str, scores: np.ndarray, families: Sequence[str], **kwargs) -> dict[str, MetricValue]:
    """:func:`summarize` for each family's examples, families in order of first appearance."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(list(families), dtype=object)
    if len(labels) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(labels)} family labels")
    return {family: summarize(metric, scores[labels == family], **kwargs) for family in dict.fromkeys(families)}
