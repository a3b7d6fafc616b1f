"""Evaluation metrics and intervals on hand-made cases: exact match, SQuAD F1, BLEU, Wilson, bootstrap."""

import math
import sys

import numpy as np
import pytest
import sacrebleu

from llmkit.errors import UserError
from llmkit.eval.metrics import (
    MetricValue,
    by_family,
    corpus_bleu,
    exact_match,
    item_scores,
    squad_normalize,
    summarize,
    token_f1,
)
from llmkit.eval.stats import bootstrap_interval, wilson_interval, z_value

# sacrebleu's README example: two reference streams for three system sentences -> BLEU 48.53
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REF_STREAMS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
               ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
REFS_PER_ITEM = [list(refs) for refs in zip(*REF_STREAMS)]


def test_exact_match_first_line_and_whitespace():
    assert exact_match("  1652 \n and then more", "1652") == 1.0
    assert exact_match("the   quick\tfox", " the quick fox ") == 1.0
    assert exact_match("ABC", "abc") == 0.0  # case matters (the tiny world's upper family)
    assert exact_match("\n1652", "1652") == 0.0  # an empty first line is an empty answer
    assert exact_match("8", ["eight", "8"]) == 1.0


def test_squad_f1_by_hand():
    assert squad_normalize("The Cat, sat!  On a mat.") == "cat sat on mat"
    # pred {cat, sat}, ref {cat, sat, down, quietly}: P = 1, R = 1/2 -> F1 = 2/3
    assert token_f1("The cat sat.", "a cat sat down quietly") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred {x, x, y}, ref {x, y, y}: overlap 2, P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "cat") == 0.0 and token_f1("dog", "cat") == 0.0
    assert token_f1("cat", ["dog", "the cat"]) == 1.0  # the best reference counts


def test_bleu_matches_sacrebleu_documented_example():
    assert corpus_bleu(SYS, REFS_PER_ITEM) == pytest.approx(48.53, abs=0.005)
    assert corpus_bleu(SYS, REFS_PER_ITEM) == pytest.approx(sacrebleu.corpus_bleu(SYS, REF_STREAMS).score)
    one_ref = [refs[0] for refs in REFS_PER_ITEM]
    assert corpus_bleu(SYS, one_ref) == pytest.approx(sacrebleu.corpus_bleu(SYS, [one_ref]).score)


def test_bleu_missing_sacrebleu_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)
    with pytest.raises(UserError, match="pip install sacrebleu"):
        corpus_bleu(["a"], ["a"])


def test_wilson_interval_by_hand():
    # 8/10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674,
    # half-width z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / (1 + z^2/10) = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    narrow, wide = wilson_interval(8, 10, 0.5), wilson_interval(8, 10, 0.99)
    assert wide[0] < low < narrow[0] and narrow[1] < high < wide[1]


def test_bootstrap_is_seeded_and_sensible():
    values = np.linspace(0, 1, 50)
    a = bootstrap_interval(values, np.mean, seed=3)
    assert a == bootstrap_interval(values, np.mean, seed=3)
    assert a != bootstrap_interval(values, np.mean, seed=4)
    assert a[0] < 0.5 < a[1] and a[1] - a[0] < 0.4
    assert bootstrap_interval([0.7] * 20, np.mean) == (pytest.approx(0.7), pytest.approx(0.7))


def test_summarize_reports_n_and_the_right_interval():
    em = summarize("exact_match", np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0.0]))
    assert (em.value, em.n, em.interval) == (0.8, 10, "wilson")
    assert (em.low, em.high) == pytest.approx(wilson_interval(8, 10))
    assert em.format() == "0.800 [0.490, 0.943] n=10"
    f1 = summarize("f1", np.array([0.5, 1.0, 0.0, 2 / 3]))
    assert f1.value == pytest.approx(13 / 24) and f1.interval == "bootstrap" and f1.low <= f1.value <= f1.high
    bleu = summarize("bleu", item_scores("bleu", SYS, REFS_PER_ITEM))
    assert bleu.value == pytest.approx(48.53, abs=0.005) and bleu.n == 3 and bleu.low <= bleu.value <= bleu.high
    assert bleu.format().startswith("48.53 [")
    empty = summarize("accuracy", np.array([]))
    assert empty.n == 0 and math.isnan(empty.value)
    assert MetricValue("f1", 0.5, 2, 0.0, 1.0, "bootstrap").to_dict()["n"] == 2


def test_per_family_breakdown():
    scores = np.array([1, 0, 1, 1, 0.0])
    families = ["add", "add", "sub", "sub", "upper"]
    out = by_family("accuracy", scores, families)
    assert list(out) == ["add", "sub", "upper"]
    assert [(v.value, v.n) for v in out.values()] == [(0.5, 2), (1.0, 2), (0.0, 1)]
    assert (out["add"].low, out["add"].high) == pytest.approx(wilson_interval(1, 2))
    bleu = by_family("bleu", item_scores("bleu", SYS, REFS_PER_ITEM), ["a", "b", "a"])
    assert bleu["a"].value == pytest.approx(corpus_bleu([SYS[0], SYS[2]], [REFS_PER_ITEM[0], REFS_PER_ITEM[2]]))
