"""DeepSpeed ZeRO through `accelerate launch` with the shipped configs, on two CPU processes (gloo): the result of one
process, exact resume, consolidated weights, the non-finite guard, and clear refusals of mismatched checkpoints.
Also reward under FSDP beside DPO under ZeRO-3: the pair objectives' held-out statistics when sharded; and PEFT under
both: the adapter and merged weights written after training."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.commands.test_distributed import FSDP_ARGS as ARGS
from tests.commands.test_distributed import FSDP_CONFIG, ROOT, accelerate_launch
from tests.commands.test_resume import curve, final_weights
from tests.conftest import cli_env, run_llmkit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (`make install` installs it)")


def zero_launch(cache_dir: Path, cwd: Path, stage: int, *args: str, offload: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file conf/accelerate/deepspeed_zero<stage>.yaml --num_processes 2 -m llmkit ...`."""
    options = ("--offload_optimizer_device", "cpu") if offload else ()
    return accelerate_launch(cache_dir, cwd, ROOT / "conf" / "accelerate" / f"deepspeed_zero{stage}.yaml", *args,
                             options=options)


def losses(run: Path) -> torch.Tensor:
    return torch.tensor([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def one_process(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero") / "one"
    done = run_llmkit(cache_dir, *ARGS, f"out_dir={out}", cwd=out.parent, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, False)], ids=["zero2", "zero2-offload", "zero3"])
def test_zero_on_two_cpu_processes_matches_one_process_and_resumes_exactly(stage, offload, one_process, cache_dir,
                                                                           tmp_path):
    run, resumed = tmp_path / "zero", tmp_path / "resumed"
    done = zero_launch(cache_dir, tmp_path, stage, *ARGS, f"out_dir={run}", offload=offload)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"DeepSpeed ZeRO-{stage} over 2 processes" in done.stdout and "Traceback" not in done.stderr
    checkpoint = run / "checkpoints" / "step_000008"
    assert sorted(p.name for p in checkpoint.glob("zero_*.pt")) == ["zero_0.pt", "zero_1.pt"]  # optimizer shards
    a, b = final_weights(one_process), final_weights(run)
    assert sorted(a) == sorted(b)  # one file of full weights (ZeRO-3: gathered), tied weights once
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(losses(run), losses(one_process), rtol=0, atol=1e-5)
    if offload:
        return
    # Stop at step 4 and resume (each process reloads its optimizer shard): bit for bit the straight run.
    assert zero_launch(cache_dir, tmp_path, stage, *ARGS, f"out_dir={resumed}", "train.max_steps=4").returncode == 0
    done = zero_launch(cache_dir, tmp_path, stage, *ARGS, f"out_dir={resumed}", "train.resume=auto")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout
    ours, theirs = final_weights(resumed), final_weights(run)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # loss, grad norm and lr of every step (the short run also evaluated at its last step, 4)
    assert [row[:4] for row in curve(resumed)] == [row[:4] for row in curve(run)]


def test_a_zero_checkpoint_and_a_plain_one_refuse_to_resume_across(one_process, cache_dir, cli, tmp_path):
    """Shards kept per process cannot resume in one process, nor a plain checkpoint under ZeRO; nothing is lost."""
    run = tmp_path / "zero"
    assert zero_launch(cache_dir, tmp_path, 2, *ARGS, f"out_dir={run}", "train.max_steps=4").returncode == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    done = cli(*ARGS, f"out_dir={run}", "train.resume=auto")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "saved by a DeepSpeed ZeRO-2 run of 2 processes" in done.stderr and "init_from" in done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    plain = tmp_path / "plain"
    assert cli(*ARGS, f"out_dir={plain}", "train.max_steps=4").returncode == 0
    done = zero_launch(cache_dir, tmp_path, 2, *ARGS, f"out_dir={plain}", "train.resume=auto")
    assert done.returncode != 0
    assert "has no DeepSpeed optimizer shard zero_0.pt" in done.stderr and "init_from" in done.stderr


def one_and_sharded(launch: str, args: list[str], cache_dir: Path, cli, tmp_path: Path) -> None:
    """The same command in one process (out_dir tmp_path/one) and on two under FSDP or ZeRO-3 (tmp_path/sharded)."""
    assert cli(*args, f"out_dir={tmp_path / 'one'}").returncode == 0
    if launch == "fsdp":
        done = accelerate_launch(cache_dir, tmp_path, FSDP_CONFIG, *args, f"out_dir={tmp_path / 'sharded'}")
    else:
        done = zero_launch(cache_dir, tmp_path, 3, *args, f"out_dir={tmp_path / 'sharded'}")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("command, launch", [("reward", "fsdp"), ("dpo", "zero3")])
def test_pair_objectives_sharded_match_one_process(command, launch, cache_dir, cli, tiny_sft, tmp_path):
    """Reward (under FSDP) and DPO (under ZeRO-3): held-out accuracy is still collected (a DeepSpeed engine's own
    `training` flag never changes) and the padding forwards of a sharded evaluation add no pairs."""
    args = [command, f"tiny/{command}", f"init_from={tiny_sft}", "train.max_steps=8", "train.eval_every=8",
            "data.tinyworld_validation=120", "logger.tensorboard=false"]  # 15 micro-batches: the second process pads one
    one_and_sharded(launch, args, cache_dir, cli, tmp_path)
    one, sharded = (json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
                    for name in ("one", "sharded"))
    assert "val_accuracy" in sharded
    for key in ("loss", "val_loss", "val_accuracy", "val_margin", *(("val_nll",) if command == "dpo" else ())):
        assert sharded[key] == pytest.approx(one[key], abs=1e-4), key


@pytest.mark.parametrize("launch, padded", [("fsdp", False), ("zero3", False), ("fsdp", True)],
                         ids=["fsdp", "zero3", "fsdp-padded-vocab"])
def test_peft_sharded_saves_the_adapter_and_merged_weights_of_one_process(launch, padded, cache_dir, cli, tiny_run,
                                                                          tmp_path):
    """The adapter and the merged model written after a sharded LoRA run: gathered from every process's shards
    (they used to be read from the live model: FSDP crashed there, ZeRO-3 wrote an adapter of empty tensors).
    padded: DoRA on a Llama base whose vocabulary 520 is padded to 576, lm_head targeted: its checkpoints used to
    hang, the main process alone running the padding's state-dict hook, a collective on sharded weights."""
    base, method = tiny_run, ["peft=lora"]
    if padded:
        base = tmp_path / "base"
        assert cli("pretrain", "tiny/pretrain", "model=tiny_llama", "model.vocab_size=520", "train.max_steps=2",
                   f"out_dir={base}", "logger.tensorboard=false").returncode == 0
        method = ["peft=dora", "peft.targets=[q_proj,lm_head]"]
    args = ["peft", "tiny/peft", f"init_from={base}", *method, "train.max_steps=4", "train.save_every=2", "merge=true",
            "logger.tensorboard=false"]
    one_and_sharded(launch, args, cache_dir, cli, tmp_path)
    for saved in ("adapter/adapter.safetensors", "merged/step_000004/model.safetensors"):
        one, sharded = (load_file(str(tmp_path / run / saved)) for run in ("one", "sharded"))
        assert sorted(sharded) == sorted(one), saved
        for name in one:
            torch.testing.assert_close(sharded[name], one[name], rtol=0, atol=1e-5)
    configs = [json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text()) for run in ("one", "sharded")]
    assert configs[1]["base_fingerprint"] == configs[0]["base_fingerprint"]
    assert cli("generate", f"run={tmp_path / 'sharded'}", "prompt=Return the", "sampling.max_new_tokens=4").returncode == 0


SHARDING_ENV = {"fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}}


@pytest.mark.parametrize("method, launch", [("prompt", "fsdp"), ("prompt", "zero3"), ("prefix", "zero3")])
def test_peft_methods_whose_hooks_fail_sharded_are_refused_before_anything_is_written(method, launch, cli, tiny_run,
                                                                                       tmp_path):
    """What accelerate puts in the environment of an FSDP or ZeRO-3 launch: these crashed in the first step."""
    done = cli("peft", "tiny/peft", f"init_from={tiny_run}", f"peft={method}", f"out_dir={tmp_path / 'run'}",
               env=SHARDING_ENV[launch])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"peft={method} does not run under" in done.stderr and "conf/accelerate/ddp.yaml" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_non_finite_guard_under_zero(cache_dir, tmp_path):
    """The engine skips a non-finite update itself; llmkit counts it (skip mode) or stops with the weights of
    the step before (stop mode), as in every other run."""
    script = Path(__file__).with_name("zero_guard.py")
    env = {**cli_env(cache_dir), "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["skip"] == {"steps": 6, "skipped": 2}
    assert result["stop"].startswith("step 5: non-finite") and result["untouched"]
