"""Smoke test of scripts/bench.py: its quickest mode runs and prints the table (no assertion on speed)."""

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import cli_env

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_quick_prints_the_table(cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], env=cli_env(cache_dir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "threads 1" in lines[0] and "torch " in lines[0]
    header = next(line for line in lines if line.startswith("section"))
    for column in ("llmkit", "peer", "ratio", "goal", "met"):
        assert column in header
    sections = {"tokenize", "startup"}
    if importlib.util.find_spec("transformers"):
        sections |= {"train", "generate"}
        assert any(line.startswith("fp32 matmul peak") for line in lines)
        assert any(line.startswith("train ") and "MFU" in line and "[sdpa]" in line for line in lines)
    else:
        assert any("transformers is not installed" in line for line in lines)
    for section in sections:
        assert any(line.startswith(section + " ") for line in lines), section
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == sections
    assert all(r["ours"] > 0 for r in rows)


def test_bench_rejects_an_unknown_section():
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


def test_bench_scripts_stay_under_500_lines():
    for script in BENCH.parent.glob("bench*.py"):
        assert len(script.read_text().splitlines()) < 500, script.name


def test_vocab_padding_experiment_trains_the_same_function(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench_common
    import bench_train

    st = bench_common.Settings(threads=1, quick=True, reps=1, experiments=True)
    rows = bench_train.bench_vocab_padding(st)
    assert [r.case for r in rows] == ["gpt2 toy V500: padded to 512, fused loss", "gpt2 toy V500: padded to 512, plain loss"]
    for row in rows:
        assert row.ours > 0 and row.peer > 0
        assert float(row.note.split("loss diff ")[1]) <= 1e-5  # zero padded rows: the same model (to fp32 rounding)


def test_adamw_experiments_run_the_named_implementation_of_the_same_update(monkeypatch):
    """--experiments' optimizer rows (optim.fused=false, foreach) train the same function as fused AdamW."""
    import pytest

    pytest.importorskip("transformers")
    import torch.optim.adam as adam

    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench_common
    import bench_train

    calls: list[str] = []
    for kind in ("fused", "multi_tensor", "single_tensor"):
        original = getattr(adam, f"_{kind}_adam")
        monkeypatch.setattr(adam, f"_{kind}_adam", lambda *a, _k=kind, _f=original, **kw: (calls.append(_k), _f(*a, **kw))[1])
    names = ("llmkit-fused_adamw", "llmkit+foreach_adamw")
    monkeypatch.setattr(bench_train, "TRAIN_EXPERIMENTS", {k: bench_train.TRAIN_EXPERIMENTS[k] for k in names})
    rows = bench_train.bench_train(bench_common.Settings(threads=1, quick=True, reps=1, experiments=True))
    assert [r.case for r in rows if r.section == "train-x"] == [f"{f} toy: {n}" for f in ("gpt2", "llama") for n in names]
    for row in rows:
        assert float(row.note.split("loss diff ")[1]) <= 1e-5, row.case
    # per family: llmkit and HF fused, one side for-loop, one foreach; each 2 warm-up steps and 1 timed step,
    # and each step runs the update once per parameter group (decayed matrices, the rest)
    assert Counter(calls) == {"fused": 24, "single_tensor": 12, "multi_tensor": 12}
