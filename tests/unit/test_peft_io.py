"""Adapter files: save -> load round trip, refusal of the wrong base, size, fingerprint."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmkit.errors import UserError
from llmkit.peft.apply import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    adapter_state_dict,
    apply_peft,
    base_fingerprint,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from llmkit.peft.config import PeftConfig
from tests.unit.peft_testing import METHODS, STYLES, make_base, perturb_adapter, tokens


def saved(tmp_path, style="gpt2", method="lora", seed=0, **kw):
    """A base, its adapted twin (trained-looking adapter) and the adapter's directory."""
    base = make_base(style, seed=seed)
    model = copy.deepcopy(base)
    cfg = PeftConfig(method=method, **kw)
    apply_peft(model, cfg)
    perturb_adapter(model)
    out = save_adapter(model, cfg, tmp_path / "adapter", base_info={"checkpoint": "runs/base/best"})
    return base, model, out


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_reproduces_the_outputs(tmp_path, style, method):
    base, model, out = saved(tmp_path, style, method)
    fresh = copy.deepcopy(base)
    info = load_adapter(fresh, out, base_info={"checkpoint": "elsewhere/base"})
    assert info.method == method and fresh.peft_state.cfg == model.peft_state.cfg
    x = tokens()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert set(load_file(str(out / ADAPTER_FILE))) == set(adapter_state_dict(model))


def test_adapter_config_records_the_method_and_the_base(tmp_path):
    base, model, out = saved(tmp_path, "llama", "dora", rank=4)
    meta = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert meta["peft"]["method"] == "dora" and meta["peft"]["rank"] == 4
    assert meta["base_model"]["n_kv_head"] == 2 and meta["base_model"]["pos"] == "rope"
    assert meta["base_fingerprint"] == base_fingerprint(base)
    assert meta["base_info"] == {"checkpoint": "runs/base/best"}
    assert meta["tensors"]["blocks.0.attn.v_proj.lora_b"] == [16, 4]


def test_loaded_adapter_merges_like_the_original(tmp_path):
    base, model, out = saved(tmp_path, "llama", "qlora", double_quant=True)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, out)
    x = tokens()
    torch.testing.assert_close(merge_adapter(fresh)(x), model(x), rtol=1e-5, atol=1e-5)


def test_prompt_init_text_survives_the_round_trip_without_a_tokenizer(tmp_path):
    base = make_base("gpt2")
    model = copy.deepcopy(base)

    class Tok:
        def encode(self, text):
            return type("Encoding", (), {"ids": [1, 2, 3]})()

    cfg = PeftConfig(method="prompt", prompt_init_text="hello")
    apply_peft(model, cfg, tokenizer=Tok())
    out = save_adapter(model, cfg, tmp_path / "a")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, out)  # no tokenizer needed: the embedding comes from the file
    assert fresh.peft_state.cfg.prompt_init_text == "hello"
    torch.testing.assert_close(fresh(tokens()), model(tokens()), rtol=0, atol=0)


def test_wrong_base_weights_are_refused(tmp_path):
    _, _, out = saved(tmp_path)
    other = make_base("gpt2", seed=1)
    with pytest.raises(UserError, match=r"different base model.*fingerprint.*runs/base/best.*other/base"):
        load_adapter(other, out, base_info={"checkpoint": "other/base"})
    assert getattr(other, "peft_state", None) is None  # refused before anything was applied


@pytest.mark.parametrize("kw, field", [({"n_layer": 3}, "n_layer"), ({"d_model": 64}, "d_model"),
                                       ({"n_kv_head": 2}, "n_kv_head")])
def test_wrong_architecture_is_refused(tmp_path, kw, field):
    _, _, out = saved(tmp_path)
    with pytest.raises(UserError, match=f"different architecture.*model.{field}="):
        load_adapter(make_base("gpt2", **kw), out)


def test_a_directory_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a saved adapter"):
        load_adapter(make_base("gpt2"), tmp_path)
    (tmp_path / ADAPTER_FILE).write_bytes(b"")
    (tmp_path / ADAPTER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        load_adapter(make_base("gpt2"), tmp_path)


def test_tampered_adapter_tensors_are_refused(tmp_path):
    _, model, out = saved(tmp_path)
    tensors = load_file(str(out / ADAPTER_FILE))
    tensors.pop("blocks.0.attn.q_proj.lora_a")
    save_file(tensors, str(out / ADAPTER_FILE))
    with pytest.raises(UserError, match="missing.*blocks.0.attn.q_proj.lora_a"):
        load_adapter(make_base("gpt2"), out)


def test_save_refuses_a_config_that_is_not_the_applied_one(tmp_path):
    model = make_base("gpt2")
    apply_peft(model, PeftConfig(rank=4))
    with pytest.raises(ValueError, match="carries"):
        save_adapter(model, PeftConfig(rank=8), tmp_path)


def test_adapter_file_is_a_tiny_fraction_of_the_base(tmp_path):
    base = make_base("llama", d_model=128)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    model = copy.deepcopy(base)
    cfg = PeftConfig(method="lora", rank=8)
    apply_peft(model, cfg)
    out = save_adapter(model, cfg, tmp_path / "adapter")
    ratio = (out / ADAPTER_FILE).stat().st_size / (tmp_path / "base.safetensors").stat().st_size
    assert ratio < 0.03


def test_fingerprint_follows_the_weights_not_the_object():
    a, b = make_base("gpt2"), make_base("gpt2")
    assert base_fingerprint(a) == base_fingerprint(b) == base_fingerprint(copy.deepcopy(a))
    with torch.no_grad():
        b.blocks[1].mlp.down_proj.weight[0, 0] = 1.0
    assert base_fingerprint(a) != base_fingerprint(b)
    apply_peft(a, PeftConfig())
    with pytest.raises(ValueError, match="plain base"):
        base_fingerprint(a)
