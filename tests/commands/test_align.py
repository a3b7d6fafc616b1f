"""`llmkit reward`, `llmkit dpo` and `llmkit ppo` end to end through the real CLI on the tiny world."""

import json
import math
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmkit.train import checkpoint as ckpt
from tests.commands.test_resume import last_logged_step, start, wait_for
from tests.conftest import run_llmkit

# Fields that depend on the machine's speed, not on what the run computed.
TIMING = ("tokens_per_s", "rollout_tokens_per_s", "update_tokens_per_s", "mfu")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_run(tiny_sft, cache_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tiny_sft.parent / "reward"
    done = run_llmkit(cache_dir, "reward", "tiny/reward", f"init_from={tiny_sft}", f"out_dir={out}",
                      "logger.tensorboard=false", cwd=out.parent)
    assert done.returncode == 0, done.stderr
    return out, done


def ppo_args(init: Path, out: Path, *extra: str) -> list[str]:
    return ["ppo", "tiny/ppo", f"init_from={init}", f"out_dir={out}", "logger.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def ppo_reference(tiny_sft, cache_dir) -> Path:
    out = tiny_sft.parent / "ppo"
    done = run_llmkit(cache_dir, *ppo_args(tiny_sft, out), cwd=out.parent)
    assert done.returncode == 0, done.stderr
    return out


def test_reward_model_learns_and_is_saved_as_one(reward_run):
    run, done = reward_run
    rows = records(run)
    vals = [r for r in rows if "val_loss" in r]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] and vals[-1]["val_loss"] < math.log(2), vals
    assert vals[-1]["val_accuracy"] > 0.5 and vals[-1]["val_margin"] > vals[0]["val_margin"] > 0, vals
    for key in ("val_margin", "val_chosen_mean", "val_chosen_std", "val_rejected_mean", "val_rejected_std"):
        assert key in vals[-1]
    assert "held-out pairwise accuracy" in done.stdout and "held-out accuracy by family: " in done.stdout
    heldout = json.loads((run / "heldout.json").read_text())
    assert abs(heldout["val_accuracy"] - vals[-1]["val_accuracy"]) < 1e-6  # metrics.jsonl rounds to 6 digits
    by_family = heldout["by_family"]  # the tiny recipe holds out 128 pairs, a quarter of them style pairs
    assert set(by_family) == {"reverse", "sort", "count", "upper", "lookup", "style"}
    assert sum(v["pairs"] for v in by_family.values()) == 128 and by_family["style"]["pairs"] == 32
    overall = sum(v["accuracy"] * v["pairs"] for v in by_family.values()) / 128
    assert abs(overall - heldout["val_accuracy"]) < 1e-6  # the same model and pairs, scored again by family
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["kind"] == "reward" and meta["command"] == "reward"
    assert {"head.weight", "head.bias"} <= set(load_file(str(latest / "model.safetensors")))
    from llmkit.model.heads import load_scalar_model

    model, _, _ = load_scalar_model(str(run), "reward")
    assert model.head.weight.shape == (1, meta["model"]["d_model"])


def test_dpo_moves_accuracy_and_margin_the_right_way(tiny_sft, cache_dir):
    out = tiny_sft.parent / "dpo"
    done = run_llmkit(cache_dir, "dpo", "tiny/dpo", f"init_from={tiny_sft}", f"out_dir={out}",
                      "logger.tensorboard=false", cwd=out.parent)
    assert done.returncode == 0, done.stderr
    vals = [r for r in records(out) if "val_loss" in r]
    # at the start the policy is its reference: every implicit reward is 0, the loss log 2, the margin 0
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] < math.log(2), vals
    assert vals[-1]["val_margin"] > vals[0]["val_margin"] > 0 and vals[-1]["val_accuracy"] > 0.5, vals
    assert all(math.isfinite(v["val_nll"]) and v["val_nll"] > 0 for v in vals), vals  # chosen answers' likelihood
    meta = json.loads((out / "checkpoints" / "step_000040" / "meta.json").read_text())
    assert meta["command"] == "dpo" and meta["chat_template"] == "chatml"


def test_ppo_runs_and_logs_every_iteration(ppo_reference):
    rows = records(ppo_reference)
    assert rows[0]["step"] == 0 and "val_reward" in rows[0]  # the held-out reward before training
    assert [r["step"] for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "value_loss", "explained_variance",
                "response_length", "ended", "rollout_tokens_per_s", "update_tokens_per_s", "grad_norm"):
        assert all(key in r for r in rows[1:]), key
    assert rows[1]["kl"] == 0.0  # the first rollout comes from the reference policy itself
    assert "val_reward" in rows[-1]
    # PPO learns: the tiny model rarely ends its answers (each costs reward.missing_eos_penalty), then it does
    train = [r["reward"] for r in rows[1:]]
    assert sum(train[3:]) > sum(train[:3]) and rows[-1]["val_ended"] > rows[0]["val_ended"], rows
    for row in (rows[0], rows[-1]):  # held-out answers sampled at the rollout temperature, too
        assert -1.0 <= row["val_sampled_reward"] <= 1.0  # exact match minus the missing-eos penalty
    assert (ppo_reference / "checkpoints" / "step_000006" / "value.safetensors").is_file()


def test_ppo_with_a_trained_reward_model_and_its_trunk_as_the_value_model(tiny_sft, reward_run, cache_dir):
    out = tiny_sft.parent / "ppo-rm"
    done = run_llmkit(cache_dir, *ppo_args(tiny_sft, out, f"reward.model={reward_run[0]}", f"value_from={reward_run[0]}",
                                           "train.max_steps=2", "train.eval_every=2"), cwd=out.parent)
    assert done.returncode == 0, done.stderr
    assert "reward model" in done.stdout
    assert [r["step"] for r in records(out)] == [0, 1, 2]
    value = ckpt.read_tensors(out / "checkpoints" / "step_000002" / "value.safetensors")
    reward = ckpt.read_tensors(ckpt.resolve_checkpoint(str(reward_run[0])) / ckpt.WEIGHTS)
    sft = {f"trunk.{name}": w for name, w in ckpt.read_tensors(ckpt.resolve_checkpoint(str(tiny_sft)) / ckpt.WEIGHTS).items()}
    names = [n for n in value if n.startswith("trunk.") and n in reward and n in sft]
    assert len(names) > 10
    distance = {side: sum(float((value[n] - weights[n]).abs().sum()) for n in names)
                for side, weights in (("reward", reward), ("sft", sft))}
    assert distance["reward"] < 0.2 * distance["sft"], distance  # the value trunk started from the reward model's, not the SFT's


def test_ppo_value_from_must_be_a_reward_run(tiny_sft, cli):
    done = cli(*ppo_args(tiny_sft, tiny_sft.parent / "ppo-bad", f"value_from={tiny_sft}"))
    assert done.returncode == 2 and "is not a reward model" in done.stderr and "Traceback" not in done.stderr


def test_ppo_refuses_a_prompt_without_an_answer_before_training(tiny_sft, cli, tmp_path):
    """reward.rule=exact_match needs every answer: a null one on line 3 is named at load, not when it is drawn."""
    rows = [{"prompt": f"Write ab{i} in capital letters.", "answer": f"AB{i}"} for i in range(40)]
    rows[2]["answer"] = None
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli(*ppo_args(tiny_sft, tmp_path / "ppo", "data.source=files", f"data.path={tmp_path / 'prompts.jsonl'}"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "prompts.jsonl:3" in done.stderr and "'answer'" in done.stderr and "reward.model=" in done.stderr
    assert not (tmp_path / "ppo" / "checkpoints").exists()


def test_ppo_sigkill_then_resume_is_bit_identical(ppo_reference, tiny_sft, cache_dir, tmp_path):
    run = tmp_path / "ppo"
    proc = start(ppo_args(tiny_sft, run), cache_dir, tmp_path)
    wait_for(lambda: last_logged_step(run) >= 3, proc)  # past the checkpoint of iteration 2
    proc.kill()
    proc.wait()
    done = run_llmkit(cache_dir, *ppo_args(tiny_sft, run, "train.resume=auto"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    final = "checkpoints/step_000006"
    sha = json.loads((run / final / "meta.json").read_text())["data_sha256"]  # the prompts, checked on resume
    assert sha is not None and sha == json.loads((ppo_reference / final / "meta.json").read_text())["data_sha256"]
    for name in ("model.safetensors", "value.safetensors"):
        ours, theirs = load_file(str(run / final / name)), load_file(str(ppo_reference / final / name))
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in theirs), name
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in records(run)]
    assert json.dumps(strip) == json.dumps([{k: v for k, v in r.items() if k not in TIMING}
                                            for r in records(ppo_reference)])


def test_ppo_with_its_output_closed_saves_the_iteration_it_stops_after(tiny_sft, cache_dir, tmp_path):
    """`llmkit ppo | head`: the iteration after the failed print is finished, saved and named (it named the
    checkpoint before it)."""
    import re

    run = tmp_path / "ppo"
    proc = start(ppo_args(tiny_sft, run), cache_dir, tmp_path)
    wait_for(lambda: last_logged_step(run) >= 1, proc)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    stopped = re.search(r"stopped by a closed standard output at iteration (\d+); checkpoint saved at (\S+)\.", err)
    assert stopped, err
    assert stopped[2].endswith(f"step_{int(stopped[1]):06d}") and (run / "checkpoints" / Path(stopped[2]).name).is_dir()


def test_alignment_without_an_sft_run_says_how(cli):
    for command in ("reward", "ppo"):  # dpo starts the same way as reward
        done = cli(command, "logger.tensorboard=false")
        assert done.returncode == 2, done.stderr
        assert "llmkit sft" in done.stderr and "init_from=" in done.stderr


def test_bad_settings_name_the_key(cli):
    done = cli("ppo", "rollout.batch_size=12", "--print-config")
    assert done.returncode == 2 and "ppo.minibatch_size" in done.stderr
    done = cli("dpo", "loss.kind=hinge", "--print-config")
    assert done.returncode == 2 and "loss.kind" in done.stderr


def test_generate_on_a_reward_model_says_what_it_is(reward_run, cli):
    done = cli("generate", f"run={reward_run[0]}", "sampling.max_new_tokens=2")
    assert done.returncode == 2
    assert "is a reward model" in done.stderr and "reward.model=" in done.stderr and "Traceback" not in done.stderr
