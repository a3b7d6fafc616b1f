"""PEFT core: config, zero-init equivalence, only adapters train, merging, switching off, counts."""

import copy
import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from llmkit.config.schema import OptimConfig
from llmkit.errors import UserError
from llmkit.model.transformer import Transformer, count_params
from llmkit.peft.apply import (
    adapter_state_dict,
    apply_peft,
    disable_adapters,
    merge_adapter,
    merged_state_dict,
    trainable_summary,
)
from llmkit.peft.config import PeftConfig
from llmkit.peft.lora import DoRALinear, LoRALinear
from llmkit.peft.nf4 import fake_quantize_nf4_
from llmkit.train.optim import build_optimizer
from tests.unit.peft_testing import (
    MERGEABLE,
    METHODS,
    STYLES,
    lm_loss,
    make_base,
    perturb_adapter,
    snapshot,
    tiny_cfg,
    tokens,
)


def adapted(style: str, method: str, **kw):
    model = make_base(style)
    info = apply_peft(model, PeftConfig(method=method, **kw))
    return model, info


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(method="lorax"), "peft.method"),
    (dict(rank=0), "peft.rank"),
    (dict(alpha=0), "peft.alpha"),
    (dict(dropout=1.0), "peft.dropout"),
    (dict(nf4_block_size=63), "peft.nf4_block_size"),
    (dict(method="prefix", targets=["q_proj"]), "peft.targets does not apply"),
    (dict(targets=["qproj"]), "peft.targets"),
    (dict(prompt_init_text="hello"), "peft.prompt_init_text"),
    (dict(method="prompt", num_virtual_tokens=0), "peft.num_virtual_tokens"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(UserError, match=match):
        PeftConfig(**kw)


def test_config_is_an_omegaconf_structured_config():
    merged = OmegaConf.merge(OmegaConf.structured(PeftConfig), OmegaConf.from_dotlist(["method=ia3", "targets=[mlp]"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, PeftConfig) and cfg.targets == ["mlp"]
    assert PeftConfig().target_patterns() == ["q_proj", "v_proj"]
    assert PeftConfig(method="ia3").target_patterns() == ["k_proj", "v_proj", "down_proj"]


def test_targets_resolve_shortcuts_and_refuse_missing_layers():
    _, info = adapted("llama", "lora", targets=["mlp", "blocks.0.attn.o_proj"])
    assert info.targets == ["blocks.0.attn.o_proj", "blocks.0.mlp.gate_proj", "blocks.0.mlp.up_proj",
                            "blocks.0.mlp.down_proj", "blocks.1.mlp.gate_proj", "blocks.1.mlp.up_proj",
                            "blocks.1.mlp.down_proj"]
    _, info = adapted("gpt2", "lora", targets=["all_linear"])
    assert "lm_head" not in info.targets and len(info.targets) == 2 * 6  # q k v o up down per block
    with pytest.raises(UserError, match="'gate_proj' matches no linear layer"):
        adapted("gpt2", "lora", targets=["gate_proj"])


def test_applying_twice_is_refused():
    model, _ = adapted("gpt2", "lora")
    with pytest.raises(ValueError, match="already applied"):
        apply_peft(model, PeftConfig())


# --- zero-init equivalence and names ---------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "ia3", "bitfit"])
def test_fresh_adapter_computes_the_base(style, method):
    base = make_base(style)
    model = copy.deepcopy(base)
    apply_peft(model, PeftConfig(method=method, targets=["all_linear"] if method != "adapter" else []))
    x = tokens()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("style", STYLES)
def test_fresh_qlora_computes_its_dequantised_base(style):
    base = make_base(style)
    model = copy.deepcopy(base)
    apply_peft(model, PeftConfig(method="qlora", targets=["all_linear"], double_quant=True))
    fake_quantize_nf4_(base, 64, double_quant=True)
    x = tokens()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "prefix", "prompt", "bitfit", "ia3"])
def test_base_state_dict_keys_are_kept(method):
    base = make_base("llama")
    model = copy.deepcopy(base)
    apply_peft(model, PeftConfig(method=method))
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys
    new = keys - set(base.state_dict())
    assert new == set(adapter_state_dict(model))  # everything new is the adapter, and nothing else is
    model.load_state_dict(base.state_dict(), strict=False)  # a base checkpoint still loads


def test_lora_layer_shares_the_base_tensors_and_scales():
    base = make_base("gpt2")
    q = base.blocks[0].attn.q_proj
    layer = LoRALinear(q, rank=4, alpha=8)
    assert layer.weight is q.weight and layer.bias is q.bias
    assert layer.lora_a.shape == (4, 32) and layer.lora_b.shape == (32, 4) and not layer.lora_b.any()
    assert layer.scale == 2.0 and LoRALinear(q, rank=4, alpha=8, rslora=True).scale == 4.0  # 8/4, 8/sqrt(4)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.std() > bound / 3


def test_lora_dropout_acts_on_the_lora_path_only():
    q = make_base("gpt2").blocks[0].attn.q_proj
    layer = LoRALinear(q, rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), q(x))  # B = 0: dropout on the LoRA input changes nothing
    with torch.no_grad():
        layer.lora_b.normal_()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # the LoRA path is dropped differently each call
    torch.testing.assert_close(layer.eval()(x), q(x) + layer.lora_delta(x))


# --- training touches only the adapter ------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_tensors_train(style, method):
    model = make_base(style).train()
    apply_peft(model, PeftConfig(method=method))
    before = snapshot(model)
    adapter_keys = set(adapter_state_dict(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, dataclasses.replace(OptimConfig(lr=1e-2), weight_decay=0.0), "cpu")
    x = tokens(4, 16)
    losses = []
    for _ in range(3):  # B = 0 gives A no gradient at step 1; by step 3 every adapter tensor moved
        loss = lm_loss(model, x)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        opt.step()
    assert len(opt.state) == len(trainable) and sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (key in adapter_keys), key


# --- merging ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_gives_a_plain_equivalent_transformer_and_leaves_the_base_bit_exact(style, method):
    model, _ = adapted(style, method, targets=["all_linear"])
    perturb_adapter(model)
    before = snapshot(model)
    merged = merge_adapter(model)
    x = tokens()
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert type(merged) is Transformer and not any(p for p in merged.modules() if hasattr(p, "peft_enabled"))
    assert set(merged.state_dict()) == set(Transformer(merged.cfg).state_dict())
    for key, value in model.state_dict().items():  # "unmerge" = drop the merged copy: nothing changed
        assert torch.equal(value, before[key]), key
    if method == "bitfit" and style == "llama":  # biases were added to a bias-free base
        assert merged.cfg.bias and not model.cfg.bias
    else:
        assert merged.cfg == model.cfg


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_merge_keeps_a_qwen2_style_base_with_biases_on_q_k_v_only(method):
    """Its own q/k/v biases are not BitFit's: a merged LoRA stays bias=False, qkv_bias=True (it used to become an
    all-bias model, with zero biases everywhere, exported as a Llama); BitFit's new biases still turn bias on."""
    model = make_base("llama", qkv_bias=True)
    apply_peft(model, PeftConfig(method=method, targets=["all_linear"]))
    perturb_adapter(model)
    merged = merge_adapter(model)
    x = tokens()
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    if method == "lora":
        assert merged.cfg == model.cfg and not merged.cfg.bias and merged.cfg.qkv_bias
        assert set(merged.state_dict()) == set(make_base("llama", qkv_bias=True).state_dict())
    else:
        assert merged.cfg.bias


def test_merge_of_an_adapted_tied_lm_head_unties_it():
    model, _ = adapted("gpt2", "lora", targets=["q_proj", "lm_head"])
    perturb_adapter(model)
    merged = merge_adapter(model)
    assert model.cfg.tie_embeddings and not merged.cfg.tie_embeddings
    x = tokens()
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.tok_emb.weight  # the adapted model still ties its base


def test_dora_merged_rows_have_the_learned_magnitude():
    model, _ = adapted("gpt2", "dora")
    perturb_adapter(model)
    layer = model.blocks[0].attn.q_proj
    assert isinstance(layer, DoRALinear)
    torch.testing.assert_close(layer.merged_weight().norm(dim=1), layer.magnitude.detach().abs())
    sd = merged_state_dict(model)
    torch.testing.assert_close(sd["blocks.0.attn.q_proj.weight"], layer.merged_weight())


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_an_adapted_lm_head_over_a_padded_vocabulary_trains_finite_and_merges(style, method):
    """Vocabulary 60 padded to 64 rows (an imported GPT-2's 50,257 -> 50,304): DoRA divided the zero padded rows
    by their zero norm (NaN in every adapter gradient); IA3 and BitFit scaled the 60-row merged weight by 64-row
    vectors (a crash)."""
    model = make_base(style, vocab_size=60, pad_vocab_multiple=64)
    apply_peft(model, PeftConfig(method=method, targets=["q_proj", "lm_head"]))
    x = tokens(vocab=60)
    lm_loss(model, x).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    perturb_adapter(model)
    if method == "bitfit":  # an output bias: no plain Transformer holds one (merge=true is refused up front)
        with pytest.raises(UserError, match="cannot be merged"):
            merge_adapter(model)
        return
    merged = merge_adapter(model)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert merged.state_dict()["lm_head.weight"].shape[0] == 60


def test_bitfit_on_lm_head_with_merge_is_refused_before_training():
    from llmkit.config.compose import compose

    with pytest.raises(UserError, match="BitFit on lm_head trains an output bias that a plain model has no place for"):
        compose("peft", None, ["peft=bitfit", "peft.targets=[all_linear,lm_head]", "merge=true"])
    compose("peft", None, ["peft=bitfit", "peft.targets=[all_linear,lm_head]"])  # unmerged it trains and loads


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter"])
def test_unmergeable_methods_say_so(method):
    model, _ = adapted("gpt2", method)
    with pytest.raises(UserError, match=f"peft.method={method} cannot be merged"):
        merge_adapter(model)


# --- switching adapters off (PPO's reference policy) -----------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", METHODS)
def test_disable_adapters_gives_the_base_and_restores(style, method):
    base = make_base(style)
    model = copy.deepcopy(base)
    apply_peft(model, PeftConfig(method=method))
    perturb_adapter(model)
    if method == "qlora":
        fake_quantize_nf4_(base)  # qlora's base is the NF4 one
    x = tokens()
    adapted_out = model(x)
    assert not torch.allclose(adapted_out, base(x), atol=1e-4)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), adapted_out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no PEFT"), disable_adapters(make_base(style)):
        pass


@pytest.mark.parametrize("method", ["adapter", "prefix", "prompt", "ia3", "bitfit"])
def test_deep_copy_carries_its_own_hooks(method):
    model, _ = adapted("llama", method)
    twin = copy.deepcopy(model)
    x = tokens()
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    perturb_adapter(twin)  # only the copy's adapter moves
    assert not torch.allclose(twin(x), model(x))
    with disable_adapters(twin):
        torch.testing.assert_close(twin(x), make_base("llama")(x), rtol=0, atol=1e-6)


# --- counts -------------------------------------------------------------------------------------------


def test_trainable_table_gpt2_lora_by_hand():
    model, info = adapted("gpt2", "lora", rank=8)
    rows = {r.name: r for r in trainable_summary(model)}
    per_layer = 8 * 32 + 32 * 8  # lora_a (r, in) + lora_b (out, r)
    q = rows["blocks.*.attn.q_proj"]
    assert (q.trainable, q.total) == (2 * per_layer, 2 * (per_layer + 32 * 32 + 32))
    assert list(rows) == ["blocks.*.attn.q_proj", "blocks.*.attn.v_proj", "total"]
    base = count_params(tiny_cfg("gpt2"))
    assert (rows["total"].trainable, rows["total"].total) == (4 * per_layer, base + 4 * per_layer)
    assert (info.trainable_params, info.total_params) == (4 * per_layer, base + 4 * per_layer)
    assert info.trainable_share == pytest.approx(2048 / (base + 2048))


def test_trainable_table_llama_gqa_and_other_methods_by_hand():
    model, info = adapted("llama", "lora", rank=8)
    v = {r.name: r for r in trainable_summary(model)}["blocks.*.attn.v_proj"]
    assert (v.trainable, v.total) == (2 * (8 * 32 + 16 * 8), 2 * (8 * 32 + 16 * 8 + 16 * 32))  # kv dim 2*8 = 16
    cfg = tiny_cfg("llama")
    expected = {  # method: trainable parameters on the tiny Llama (d=32, ff=128, kv dim 16, 2 layers)
        "ia3": 2 * (16 + 16 + 128),
        "bitfit": 2 * (32 + 16 + 16 + 32 + 128 + 128 + 32),
        "adapter": 2 * 2 * (32 * 16 + 16 + 16 * 32 + 32),
        "prefix": 2 * 2 * 2 * 8 * 8,  # layers * (k, v) * kv heads * tokens * head dim
        "prompt": 8 * 32,
        "qlora": 2 * (8 * 32 + 32 * 8) + 2 * (8 * 32 + 16 * 8),
    }
    for method, n in expected.items():
        _, info = adapted("llama", method)
        assert info.trainable_params == n, method
        assert info.total_params == count_params(cfg) + n, method  # NF4 weights count as parameters
    _, info = adapted("llama", "prefix", prefix_projection=True, prefix_hidden=64)
    assert info.trainable_params == 8 * 32 + (32 * 64 + 64) + (64 * 2 * 2 * 16 + 2 * 2 * 16)
