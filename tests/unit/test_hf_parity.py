"""HF weight maps: random tiny GPT-2 / Llama from transformers configs give our logits to ~1e-5, both ways."""

import pytest
import torch

from llmkit.errors import UserError
from llmkit.model.hf import (
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    transformer_from_hf,
)
from llmkit.model.transformer import Transformer

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


def tiny_llama(**kw):
    base = dict(vocab_size=V, max_position_embeddings=24, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    cfg = transformers.LlamaConfig(**base)
    torch.manual_seed(0)
    return randomize(transformers.LlamaForCausalLM(cfg))


CASES = {
    "gpt2": lambda: tiny_gpt2(),
    "gpt2_ff": lambda: tiny_gpt2(n_inner=40),
    "llama_gqa": lambda: tiny_llama(),
    "llama_tied_mha_bias": lambda: tiny_llama(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                              mlp_bias=True, rope_theta=500.0,
                                              rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def hf_logits(hf, tokens, **kw):
    with torch.no_grad():
        return hf(input_ids=tokens, **kw).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case):
    hf = CASES[case]()
    family = "gpt2" if case.startswith("gpt2") else "llama"
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


def test_unmappable_weights_raise_user_error():
    hf = tiny_llama()
    cfg = config_from_hf(hf.config)
    sd = hf.state_dict()
    with pytest.raises(UserError, match="cannot map"):
        state_dict_from_hf({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, cfg, "llama")
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="up_proj"):
        state_dict_from_hf(sd, cfg, "llama")
