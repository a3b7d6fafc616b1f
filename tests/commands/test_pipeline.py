"""The embedded-default commands end to end through the real CLI: tokenize -> pretrain -> generate -> evaluate."""

import json

import numpy as np
from safetensors.torch import load_file


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_pretrain_writes_a_complete_run_and_loss_falls(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.json", "checkpoints/latest"):
        assert (tiny_run / name).exists(), name
    latest = tiny_run / "checkpoints" / (tiny_run / "checkpoints" / "latest").read_text().strip()
    assert (latest / "COMPLETE").is_file() and (latest / "model.safetensors").is_file()
    assert load_file(str(latest / "model.safetensors"))["tok_emb.weight"].shape == (512, 64)
    records = read_metrics(tiny_run)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) >= 3
    assert vals[-1] < vals[0] - 0.3, vals
    assert records[-1]["step"] == 30
    assert {"loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= set(records[-1])


def test_tokenize_then_pretrain_from_its_shards(cli, tmp_path):
    done = cli("tokenize", "tokenizer=bpe512", "data.max_documents=200", "out_dir=tok")
    assert done.returncode == 0, done.stderr
    assert "bytes/token" in done.stdout
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert np.dtype(meta["dtype"]) == np.uint16 and meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    train = np.fromfile(tmp_path / "tok" / "train.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"]
    done = cli("pretrain", "tiny/pretrain", "tokens_dir=tok", "train.max_steps=4", "out_dir=run")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_000004" / "COMPLETE").is_file()


def test_default_run_directory_and_latest_pointer(cli, tmp_path):
    done = cli("pretrain", "tiny/pretrain", "train.max_steps=2", "train.eval_every=2")
    assert done.returncode == 0, done.stderr
    latest = tmp_path / "runs" / "pretrain" / "latest"
    assert latest.is_symlink() and (latest / "config.yaml").is_file()
    done = cli("generate", "sampling.max_new_tokens=5", "sampling.temperature=0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Return the")


def test_generate_is_reproducible_and_handles_a_batch(cli, tiny_run):
    args = ("generate", f"run={tiny_run}", "sampling.max_new_tokens=12", "sampling.seed=3")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    batch = cli("generate", f"run={tiny_run}", "prompts=[def,The value,Return]", "sampling.temperature=0",
                "sampling.max_new_tokens=6")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.count("-" * 40) == 3


def test_evaluate_compares_runs_in_one_table_and_json(cli, tiny_run, tmp_path):
    step10 = tiny_run / "checkpoints" / "step_000010"
    runs = [tiny_run] + ([step10] if step10.exists() else [])
    done = cli("evaluate", f"runs=[{','.join(map(str, runs))}]", f"output={tmp_path / 'eval.json'}",
               "tasks=[tinyworld_choice,example_qa]", "limit=8", "num_fewshot=1")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "eval.json").read_text())
    assert len(results) == len(runs)
    final = results[0]["perplexity"]
    assert results[0]["step"] == 30 and final["tokens"] > 0
    assert abs(final["perplexity"] - np.exp(final["loss"])) < 1e-3 * final["perplexity"]
    assert 0 < final["bits_per_byte"] < 10
    if len(runs) > 1:  # the later checkpoint fits the held-out text better
        assert final["loss"] < results[1]["perplexity"]["loss"]
    tasks = {t["task"]: t for t in results[0]["tasks"]}
    assert tasks["tinyworld_choice"]["n"] == 8 and tasks["tinyworld_choice"]["num_fewshot"] == 1
    assert "perplexity" in done.stdout and "tinyworld_choice" in done.stdout and "n=8" in done.stdout


def test_pipeline_script_runs_every_stage_and_prints_the_table(cache_dir, tmp_path):
    import os
    import subprocess
    from pathlib import Path

    from tests.conftest import cli_env

    script = Path(__file__).resolve().parents[2] / "scripts" / "pipeline.sh"
    env = {**cli_env(cache_dir), "TINY": "1", "PATH": f"{Path(__import__('sys').executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script), str(tmp_path / "p")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for stage in ("| pretrain |", "| sft |", "| ppo |", "| dpo |", "| reward model |"):
        assert stage in done.stdout
    assert "held-out pair accuracy" in done.stdout and "KL to reference" in done.stdout
    assert "PPO's families (upper; 8 questions)" in done.stdout  # the second, family-only evaluation ran
