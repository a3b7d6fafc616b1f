"""`llmkit peft` through the real CLI: adapter-only checkpoints, base + adapter loading, merge, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.commands.test_resume import assert_same_run, last_logged_step, start, wait_for


def peft_args(base, out, *extra):
    return ["peft", "tiny/peft", f"init_from={base}", f"out_dir={out}", "train.log_every=1", "logger.tensorboard=false",
            *extra]


def test_lora_trains_only_the_adapter_and_merges_exactly(cli, tiny_run, tmp_path):
    run = tmp_path / "lora"
    done = cli(*peft_args(tiny_run, run, "merge=true"))
    assert done.returncode == 0, done.stderr
    assert "trainable" in done.stdout and "total" in done.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0], vals
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    base_size = (tiny_run / "checkpoints" / "step_000030" / "model.safetensors").stat().st_size
    assert (run / "adapter" / "adapter.safetensors").stat().st_size < 0.1 * base_size
    # Optimizer state exists for the adapter's parameters only (the frozen base has none).
    state = torch.load(run / "checkpoints" / "step_000020" / "state.pt", weights_only=True)
    moments = sum(v.numel() for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step")
    assert moments == 2 * sum(t.numel() for t in adapter.values())
    # base + adapter and the merged plain checkpoint score the same held-out loss.
    merged = next((run / "merged").glob("step_*"))
    out = tmp_path / "eval.json"
    done = cli("evaluate", f"runs=[{run},{merged},{run / 'adapter'}]", f"output={out}", "max_batches=2")
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    losses = [r["perplexity"]["loss"] for r in results]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4) and losses[0] == pytest.approx(losses[2], abs=1e-6)
    assert results[0]["step"] == results[2]["step"] == 20  # the adapter's own steps, not its base's 30
    before = out.read_text()  # an adapter's results go beside it, never two levels up (here: over `out`)
    assert cli("evaluate", f"runs=[{run / 'adapter'}]", "max_batches=1").returncode == 0
    assert (run / "adapter" / "eval.json").is_file() and out.read_text() == before
    done = cli("generate", f"run={run}", "prompt=What is 2 + 3?", "sampling.max_new_tokens=4")
    assert done.returncode == 0, done.stderr


def test_adapter_on_the_wrong_base_is_refused(cli, tiny_run, tmp_path):
    run = tmp_path / "lora"
    assert cli(*peft_args(tiny_run, run, "train.max_steps=2")).returncode == 0
    other = tmp_path / "other-base"
    assert cli("pretrain", "tiny/pretrain", "train.max_steps=2", "train.seed=5", f"out_dir={other}").returncode == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_info"]["checkpoint"] = str(other)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    done = cli("generate", f"run={run / 'adapter'}", "sampling.max_new_tokens=2")
    assert done.returncode == 2
    assert "another base model" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt", "bitfit", "adapter", "qlora"])
def test_every_method_runs_through_the_cli(method, cli, tiny_run, tmp_path):
    done = cli(*peft_args(tiny_run, tmp_path / method, f"peft={method}", "train.max_steps=3", "train.eval_every=3"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / method / "adapter" / "adapter.safetensors").is_file()


def test_lm_objective_adapts_to_plain_text(cli, tiny_run, tmp_path):
    done = cli(*peft_args(tiny_run, tmp_path / "lm", "objective=lm", "corpus.max_documents=60", "train.seq_len=64",
                          "train.max_steps=4", "train.eval_every=4"))
    assert done.returncode == 0, done.stderr


def test_peft_sigkill_then_resume_is_bit_identical(cli, cache_dir, tiny_run, tmp_path):
    args = ("train.save_every=4",)
    reference = tmp_path / "reference"
    assert cli(*peft_args(tiny_run, reference, *args)).returncode == 0
    run = tmp_path / "run"
    proc = start(peft_args(tiny_run, run, *args), cache_dir, tmp_path)
    wait_for(lambda: last_logged_step(run) >= 6, proc)
    proc.kill()
    proc.wait()
    done = cli(*peft_args(tiny_run, run, *args), "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(run, reference)
