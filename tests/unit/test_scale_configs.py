"""The shipped accelerate configs parse with accelerate's own loader and say what docs/scale.md says; the FSDP and
DeepSpeed settings they put in the environment are read (or refused) clearly; the real-scale recipes compose."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from llmkit.errors import UserError
from llmkit.train.runtime import FSDPSettings, check_deepspeed, fsdp_settings

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
        if kind == "DEEPSPEED":
            assert config.deepspeed_config["zero_stage"] == int(name[-1])
    multi = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert multi.num_machines == 2 and multi.main_process_ip and multi.main_process_port
    assert multi.num_processes == 16 and multi.machine_rank == 0


FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP",
            "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS", "ACCELERATE_USE_DEEPSPEED",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE")


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


@pytest.mark.parametrize("key, value, match", [("FSDP_VERSION", "1", "FSDP2"),
                                               ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP")])
def test_unsupported_fsdp_settings_are_refused(env, key, value, match):
    env.setenv("ACCELERATE_USE_FSDP", "true")
    env.setenv("FSDP_VERSION", "2")
    env.setenv(key, value)
    with pytest.raises(UserError, match=match):
        fsdp_settings()


def test_deepspeed_is_refused_naming_the_config(env):
    check_deepspeed()  # not asked for: nothing to say
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(UserError, match="ZeRO-3.*deepspeed_zero3.yaml"):
        check_deepspeed()


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
