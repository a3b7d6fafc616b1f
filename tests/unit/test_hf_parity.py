"""HF weight maps: random tiny GPT-2 / Llama / Mistral / Qwen2 from transformers configs give our logits to ~1e-5,
both ways."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from llmkit.errors import UserError
from llmkit.model.hf import (
    config_from_hf,
    config_to_hf,
    family_of_config,
    state_dict_from_hf,
    state_dict_to_hf,
    transformer_from_hf,
)
from llmkit.model.transformer import Transformer, count_params

transformers = pytest.importorskip("transformers")

V = 67


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises biases to 0 and norms to 1: perturb everything so no mapping slip can hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    torch.manual_seed(0)
    return randomize(transformers.GPT2LMHeadModel(cfg))


def tiny_llama(config=None, model=None, **kw):
    base = dict(vocab_size=V, max_position_embeddings=24, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    cfg = (config or transformers.LlamaConfig)(**base)
    torch.manual_seed(0)
    return randomize((model or transformers.LlamaForCausalLM)(cfg))


def tiny_qwen2(**kw):
    return tiny_llama(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, **kw)


def tiny_mistral(**kw):
    return tiny_llama(transformers.MistralConfig, transformers.MistralForCausalLM, head_dim=None, **kw)


CASES = {
    "gpt2": lambda: tiny_gpt2(),
    "gpt2_ff": lambda: tiny_gpt2(n_inner=40),
    "llama_gqa": lambda: tiny_llama(),
    "llama_tied_mha_bias": lambda: tiny_llama(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                              mlp_bias=True, rope_theta=500.0,
                                              rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "qwen2_tied": lambda: tiny_qwen2(tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "mistral": lambda: tiny_mistral(sliding_window=None),
    "llama_rope_linear": lambda: tiny_llama(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}),
    "llama_rope_llama3": lambda: tiny_llama(rope_parameters=LLAMA3_ROPE),
}
# Llama 3.1's rope type at a tiny scale: with head size 8 (frequencies 1, .1, .01, .001) and an original context of
# 64, one frequency is kept, one blended and two divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def hf_logits(hf, tokens, **kw):
    with torch.no_grad():
        return hf(input_ids=tokens, **kw).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case):
    hf = CASES[case]()
    family = case.split("_")[0]
    cfg = config_from_hf(hf.config)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, family))
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine = ours(tokens)
    theirs = hf_logits(hf, tokens)
    assert theirs.abs().max() > 0.1  # logits are not trivially small
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    # Round trip: our weights back to HF names give the identical HF state dict and logits.
    back = state_dict_to_hf(ours.state_dict(), cfg, family)
    ref = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert back.keys() == ref.keys()
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    fresh = type(hf)(config_to_hf(cfg, family)).eval()
    fresh.load_state_dict(back)
    torch.testing.assert_close(hf_logits(fresh, tokens), theirs, rtol=1e-6, atol=1e-6)


def test_rope_scaling_is_read_written_and_changes_what_the_model_computes():
    """The scaled cases above would pass with unscaled rope if scaling did nothing here: it does."""
    tokens = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(3))
    for case in ("llama_rope_linear", "llama_rope_llama3"):
        scaled = CASES[case]()
        plain = tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": scaled.config.rope_parameters["rope_theta"]})
        assert (hf_logits(scaled, tokens) - hf_logits(plain, tokens)).abs().max() > 1e-2, case
    cfg = config_from_hf(CASES["llama_rope_llama3"]().config)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_theta) == ("llama3", 8.0, 64, 1.0, 4.0, 10000.0)
    exported = config_to_hf(cfg, "llama").to_dict()
    assert {k: exported["rope_parameters"][k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    old_style = transformers.LlamaConfig(rope_theta=5e5, rope_scaling={  # a Llama 3.2 config.json of transformers 4.x
        "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"})
    cfg = config_from_hf(old_style)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context, cfg.rope_theta) == ("llama3", 32.0, 8192, 5e5)
    for scaling, message in (({"rope_type": "yarn", "factor": 4.0}, "llmkit reads the default, linear and llama3"),
                             ({"rope_type": "dynamic", "factor": 2.0}, "llmkit reads the default, linear and llama3"),
                             ({"rope_type": "llama3", "factor": 8.0}, "lacks low_freq_factor, high_freq_factor")):
        with pytest.raises(UserError, match=message):
            config_from_hf(SimpleNamespace(**{**tiny_llama().config.to_dict(), "rope_parameters": None,
                                              "rope_scaling": scaling}))


def test_left_padded_llama_matches_hf_with_position_ids():
    hf = tiny_llama()
    ours = transformer_from_hf(hf).eval()
    tokens = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    tokens[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        mine = ours(tokens, positions=positions, attention_mask=mask)
    theirs = hf_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(mine[mask.bool()], theirs[mask.bool()], rtol=1e-5, atol=1e-5)


def test_config_mapping():
    cfg = config_from_hf(tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 1234.0}).config)
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.n_kv_head, cfg.d_ff, cfg.block_size) == ("rmsnorm", "rope", "swiglu", 2, 48, 24)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.bias) == (1234.0, 1e-6, False, False)
    cfg = config_from_hf(tiny_gpt2().config)
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.d_ff, cfg.tie_embeddings, cfg.bias) == ("layernorm", "learned", "gelu", 128, True, True)
    with pytest.raises(UserError, match="model_type"):
        config_from_hf(transformers.BertConfig())
    with pytest.raises(UserError, match="activation"):
        config_from_hf(transformers.GPT2Config(activation_function="relu"))


def test_qwen2_has_qkv_biases_only_and_exports_as_qwen2():
    cfg = config_from_hf(tiny_qwen2().config)
    assert (cfg.bias, cfg.qkv_bias, cfg.attn_qkv_bias) == (False, True, True)
    model = Transformer(cfg)
    assert model.blocks[0].attn.q_proj.bias is not None and model.blocks[0].attn.o_proj.bias is None
    assert model.blocks[0].mlp.up_proj.bias is None
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert family_of_config(cfg) == "qwen2" and type(config_to_hf(cfg, "qwen2")).__name__ == "Qwen2Config"
    assert family_of_config(config_from_hf(tiny_mistral(sliding_window=None).config)) == "llama"
    with pytest.raises(UserError, match="no HF architecture"):  # o/mlp biases without q/k/v biases: no HF class
        family_of_config(dataclasses.replace(cfg, bias=True, qkv_bias=False))


def test_sliding_window_caps_the_context_where_it_equals_full_attention():
    windowed = tiny_mistral(sliding_window=16)
    cfg = config_from_hf(windowed.config)
    assert cfg.block_size == 16  # max_position_embeddings 24, window 16
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(windowed.state_dict(), cfg, "mistral"))
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(windowed, tokens), rtol=1e-5, atol=1e-5)
    assert config_from_hf(tiny_qwen2(sliding_window=16).config).block_size == 24  # use_sliding_window false
    assert config_from_hf(tiny_mistral(sliding_window=None).config).block_size == 24


def test_unmappable_weights_raise_user_error():
    hf = tiny_llama()
    cfg = config_from_hf(hf.config)
    sd = hf.state_dict()
    with pytest.raises(UserError, match="cannot map"):
        state_dict_from_hf({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, cfg, "llama")
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="up_proj"):
        state_dict_from_hf(sd, cfg, "llama")
