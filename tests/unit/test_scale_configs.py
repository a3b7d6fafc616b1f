"""The shipped accelerate configs parse with accelerate's own loader and say what docs/scale.md says; the FSDP and
DeepSpeed settings they put in the environment are read (or refused) clearly; the real-scale recipes compose."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from llmkit.errors import UserError
from llmkit.train import zero
from llmkit.train.runtime import FSDPSettings, fsdp_settings
from llmkit.train.zero import ZeroSettings, zero_settings

CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
            "multi_node": "FSDP"}


def test_every_accelerate_config_parses_with_accelerates_loader():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, kind in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert config.distributed_type.value == kind, name
        if kind == "FSDP":
            fsdp = config.fsdp_config
            assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
            assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
            assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Block"
        if kind == "DEEPSPEED":  # only the fields llmkit reads: it sets accumulation and clipping itself
            assert config.deepspeed_config == {"zero_stage": int(name[-1]), "offload_optimizer_device": "none",
                                               "offload_param_device": "none"}
            assert config.mixed_precision == "no"  # bf16 is llmkit's autocast (train.precision)
    multi = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert multi.num_machines == 2 and multi.main_process_ip and multi.main_process_port
    assert multi.num_processes == 16 and multi.machine_rank == 0


FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP",
            "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS", "ACCELERATE_USE_DEEPSPEED",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_GRADIENT_CLIPPING",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")


@pytest.fixture
def env(monkeypatch):
    for name in FSDP_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_fsdp_settings_come_from_the_accelerate_environment(env):
    assert fsdp_settings() is None
    env.setenv("ACCELERATE_USE_FSDP", "true")
    env.setenv("FSDP_VERSION", "2")
    assert fsdp_settings() == FSDPSettings()
    env.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    env.setenv("FSDP_OFFLOAD_PARAMS", "true")
    env.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block, MLP")
    assert fsdp_settings() == FSDPSettings(("Block", "MLP"), reshard_after_forward=False, offload_params=True)


def test_zero_settings_come_from_the_accelerate_environment(env):
    assert zero_settings() is None
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    env.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    assert zero_settings() == ZeroSettings(2)
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    env.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    env.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    assert zero_settings() == ZeroSettings(3, offload_optimizer="cpu", offload_param="cpu")


REFUSED = [
    (fsdp_settings, "FSDP_VERSION", "1", "FSDP2"),
    (fsdp_settings, "FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP"),
    (zero_settings, "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json", "deepspeed_config_file ds.json.*remove"),
    (zero_settings, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "gradient_accumulation_steps: 4.*train.batch_size"),
    (zero_settings, "ACCELERATE_GRADIENT_CLIPPING", "1.0", "gradient_clipping: 1.0.*optim.grad_clip"),
    (zero_settings, "ACCELERATE_DEEPSPEED_ZERO_STAGE", "4", "zero_stage must be 1, 2 or 3"),
    (zero_settings, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "nvme", "offload_optimizer_device nvme.*none or cpu"),
    (zero_settings, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu", "offload_param_device needs zero_stage 3"),
]


@pytest.mark.parametrize("reader, key, value, match", REFUSED)
def test_settings_llmkit_does_not_run_are_refused_naming_the_field(env, reader, key, value, match):
    if reader is zero_settings and zero.importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: every DeepSpeed launch is refused before these checks")
    base = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"} if reader is fsdp_settings else {
        "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    for name, setting in {**base, key: value}.items():
        env.setenv(name, setting)
    with pytest.raises(UserError, match=match):
        reader()


def test_a_deepspeed_launch_without_deepspeed_says_how(env):
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    env.setattr(zero.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="ZeRO-3.*deepspeed_zero3.yaml.*pip install deepspeed"):
        zero_settings()



def test_a_zero_shard_that_does_not_load_names_the_shard_file():
    """Sizes that fit but a structure the optimizer refuses (here one parameter group instead of two)."""
    import torch

    groups = [{"params": [torch.nn.Parameter(torch.zeros(4))]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}]
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=torch.optim.AdamW(groups)))
    saved = {"zero_stage": 2, "processes": 2,
             "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 1e-3}]}}
    with pytest.raises(UserError, match=r"ckpt/zero_1\.pt does not match this run's optimizer.*init_from"):
        zero.load_optimizer_state(engine, ZeroSettings(2), 2, saved, "ckpt/zero_1.pt")

@pytest.mark.parametrize("recipe, expect", [
    ("gpu/gpt2_124m_fineweb_edu", ["name: gpt2_124m", "hub_name: HuggingFaceFW/fineweb-edu", "streaming: true",
                                   "seq_len: 1024", "batch_size: 512"]),
    ("gpu/llama_1b", ["name: llama_1b", "hub_name: HuggingFaceFW/fineweb-edu", "seq_len: 2048",
                      "activation_checkpointing: false"]),
])
def test_real_scale_recipes_print_their_config_offline(cli, recipe, expect):
    done = cli("pretrain", recipe, "--print-config")
    assert done.returncode == 0, done.stderr
    for line in expect:
        assert line in done.stdout, line
    done = cli("pretrain", recipe, "train.activation_checkpointing=true", "--print-config")
    assert "activation_checkpointing: true" in done.stdout
