"""The Transformer: shapes, causality, packing, padding, KV cache, parameter counts, tying, limits."""

import dataclasses
import math

import pytest
import torch

from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer, count_params, flops_per_token

V = 61


def gpt2_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, d_model=32, **kw)


def llama_cfg(**kw) -> ModelConfig:
    base = dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False)
    base.update(kw)
    return ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, d_model=32, **base)


STYLES = {"gpt2": gpt2_cfg, "llama_gqa": llama_cfg, "llama_mha_tied": lambda: llama_cfg(n_kv_head=None, tie_embeddings=True)}


def make(style: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(STYLES[style]()).eval()
    # Make norm weights/biases non-trivial so a mapping or masking slip cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def positions_for(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize("style", STYLES)
def test_shapes(style):
    model = make(style)
    tokens = torch.randint(0, V, (3, 11))
    assert model(tokens).shape == (3, 11, V)
    hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (3, 11, 32)
    torch.testing.assert_close(model.logits(hidden), model(tokens))


@pytest.mark.parametrize("style", STYLES)
def test_causal(style):
    model = make(style)
    tokens = torch.randint(0, V, (2, 16))
    changed = tokens.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % V
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


@pytest.mark.parametrize("style", STYLES)
def test_packed_doc_ids_match_separate_runs(style):
    model = make(style)
    lengths = [5, 3, 8]
    docs = [torch.randint(0, V, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]  # (1, 16)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    logits = model(packed, positions=positions_for(lengths)[None], doc_ids=doc_ids)[0]
    start = 0
    for doc in docs:
        alone = model(doc[None])[0]
        torch.testing.assert_close(logits[start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
        start += len(doc)
    # Without doc_ids the later documents would see the earlier ones: the mask really matters.
    leaky = model(packed, positions=positions_for(lengths)[None])[0]
    assert (leaky[5:8] - logits[5:8]).abs().max() > 1e-3


@pytest.mark.parametrize("style", STYLES)
def test_left_padded_rows_match_unpadded(style):
    model = make(style)
    prompts = [torch.randint(0, V, (n,)) for n in (4, 9, 1)]
    T = 9
    tokens = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = p
        mask[i, T - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(tokens, positions=positions, attention_mask=mask)
    assert torch.isfinite(logits).all()  # fully padded query rows must not produce NaN
    for i, p in enumerate(prompts):
        alone = model(p[None])[0]
        torch.testing.assert_close(logits[i, T - len(p) :], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_matches_full_forward(style):
    model = make(style)
    tokens = torch.randint(0, V, (2, 14))
    full = model(tokens)
    cache = model.new_cache(2, 14)
    parts = [model(tokens[:, :6], cache=cache), model(tokens[:, 6:10], cache=cache)]  # chunked prefill
    parts += [model(tokens[:, t : t + 1], cache=cache) for t in range(10, 14)]  # one token at a time
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_gqa_cache_stores_kv_heads_only():
    model = make("llama_gqa")
    cache = model.new_cache(3, 20)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 20, 8)  # n_layer x (B, n_kv_head, max_len, head_dim)


@pytest.mark.parametrize(
    "cfg",
    [
        gpt2_cfg(),
        gpt2_cfg(bias=False, tie_embeddings=False),
        gpt2_cfg(d_ff=48),
        llama_cfg(),
        llama_cfg(n_kv_head=1, bias=True, tie_embeddings=True),
        llama_cfg(norm="layernorm", pos="learned", d_ff=100),
        ModelConfig(vocab_size=100, block_size=16, n_layer=3, n_head=6, n_kv_head=3, d_model=48, mlp="swiglu"),
    ],
)
def test_param_count_matches_formula(cfg):
    model = Transformer(cfg)
    assert model.num_params() == count_params(cfg)
    assert model.num_params(non_embedding=True) == count_params(cfg, non_embedding=True)
    d = cfg.d_model
    excluded = (cfg.block_size * d if cfg.pos == "learned" else 0) + (0 if cfg.tie_embeddings else cfg.padded_vocab * d)
    assert count_params(cfg) - count_params(cfg, non_embedding=True) == excluded


def test_param_count_by_hand():
    # GPT-2 small: the well-known 124,439,808 parameters (tied, with position embedding).
    cfg = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, pad_vocab_multiple=1)
    assert count_params(cfg) == 124_439_808
    assert flops_per_token(cfg, 1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 1024 * 768
    # PEFT: the frozen base takes no weight-gradient matmuls (4 FLOPs per parameter), the adapter all 6
    assert flops_per_token(cfg, 1024, adapter_params=1000) == 4 * (124_439_808 - 1024 * 768) + 6000 + 12 * 12 * 1024 * 768
    # Padded to 50304 rows (the default multiple of 64): 47 more embedding rows, as nanoGPT's 124.48M.
    assert count_params(dataclasses.replace(cfg, pad_vocab_multiple=64)) == 124_439_808 + 47 * 768


def test_tied_weights_are_shared():
    model = Transformer(gpt2_cfg())
    assert model.lm_head.weight is model.tok_emb.weight
    with torch.no_grad():
        model.tok_emb.weight[3, 0] = 7.0
    assert model.lm_head.weight[3, 0].item() == 7.0
    untied = Transformer(llama_cfg())
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_init_scales_residual_projections():
    cfg = ModelConfig(vocab_size=V, block_size=8, n_layer=8, n_head=4, d_model=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    block = model.blocks[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert block.attn.q_proj.bias.abs().max().item() == 0.0
    assert torch.equal(block.attn_norm.weight, torch.ones(128))


def test_state_dict_has_no_rope_buffers():
    keys = Transformer(llama_cfg()).state_dict().keys()
    assert not [k for k in keys if "rope" in k]
    assert "pos_emb.weight" not in keys


def test_gradients_reach_every_parameter():
    model = Transformer(llama_cfg(dropout=0.1, bias=True)).train()
    tokens = torch.randint(0, V, (2, 12))
    model(tokens, doc_ids=torch.tensor([[0] * 6 + [1] * 6] * 2)).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_too_long_input_raises_user_error():
    model = Transformer(gpt2_cfg())
    with pytest.raises(UserError, match=r"sequence of 33 tokens is longer than .*block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="30 cached"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_padding_mask_never_leaves_a_query_without_keys():
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    built = Transformer._attention_mask(2, 5, 0, None, mask, torch.device("cpu"))  # (B, 1, T, S)
    assert built.shape == (2, 1, 5, 5)
    assert built.any(dim=-1).all()
    assert not built[0, 0, 4, :3].any()  # real tokens never attend to padding
    assert built[0, 0, 4, 3:].all() and not built[1, 0, 1, 2:].any()  # causal


@pytest.mark.parametrize("style", STYLES)
def test_attention_mask_is_never_read_on_the_host(style, monkeypatch):
    """An all-ones attention_mask gives the outputs of no mask, without a host read (a device sync on GPU)."""
    model = make(style)
    tokens = torch.randint(0, V, (2, 12))
    plain = model(tokens)

    def no_host_read(*args):
        raise AssertionError("tensor value read on the host during the forward")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    masked = model(tokens, attention_mask=torch.ones_like(tokens))
    cache = model.new_cache(2, 12)
    model(tokens[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), cache=cache)
    step = model(tokens[:, 8:9], attention_mask=torch.ones(2, 9, dtype=torch.long), cache=cache)
    monkeypatch.undo()
    torch.testing.assert_close(masked, plain)
    torch.testing.assert_close(step[:, 0], plain[:, 8])


def test_sdpa_gets_the_causal_fast_path_without_a_mask(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["attn_mask"] is None, kwargs["is_causal"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = make("llama_gqa")
    tokens = torch.randint(0, V, (2, 6))
    model(tokens)
    assert calls and all(c == (True, True) for c in calls)
    calls.clear()
    model(tokens, attention_mask=torch.ones_like(tokens))
    assert calls and all(c == (False, False) for c in calls)


@pytest.mark.parametrize("field, value", [("n_kv_head", -1), ("n_kv_head", 0), ("d_ff", -5), ("init_std", -1.0),
                                          ("init_std", math.nan), ("init_std", math.inf), ("norm_eps", -1.0),
                                          ("norm_eps", math.inf), ("rope_theta", 0.0), ("rope_theta", math.nan),
                                          ("dropout", 1.0), ("dropout", math.nan)])
def test_out_of_range_model_settings_are_refused_naming_the_key(field, value):
    """Each of these used to reach torch (a negative dimension, a NaN loss blamed on the learning rate)."""
    with pytest.raises(UserError, match=rf"model\.{field} must be"):
        ModelConfig(**{field: value, "pos": "rope"})


@pytest.mark.parametrize("settings, message", [
    ({"rope_scaling": "yarn"}, r"model\.rope_scaling='yarn' is not one of none, linear, llama3"),
    ({"rope_scaling": "linear", "pos": "learned", "rope_factor": 2.0}, r"needs model\.pos=rope"),
    ({"rope_factor": 8.0}, r"model\.rope_factor=8\.0 has no effect with model\.rope_scaling=none"),
    ({"rope_scaling": "linear", "rope_factor": 2.0, "rope_original_context": 64}, r"rope_original_context is a setting of"),
    ({"rope_scaling": "llama3", "rope_factor": 0.0}, r"model\.rope_factor must be positive"),
    ({"rope_scaling": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 4.0}, r"must be below"),
])
def test_rope_scaling_settings_that_would_be_ignored_or_break_the_frequencies_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{"pos": "rope", **settings})


def test_rope_scaling_stretches_the_frequencies_as_its_type_says():
    from llmkit.model.transformer import rope_frequencies

    base = ModelConfig(pos="rope", d_model=32, n_head=4, rope_theta=10000.0)  # head 8: frequencies 1, .1, .01, .001
    plain = rope_frequencies(base)
    torch.testing.assert_close(plain, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    linear = dataclasses.replace(base, rope_scaling="linear", rope_factor=4.0)
    torch.testing.assert_close(rope_frequencies(linear), plain / 4)
    # original context 64: wavelengths below 64/4 = 16 stay (2pi), above 64/1 are divided by 8 (628, 6283), and
    # 62.8 is blended: smooth = (64 / 62.8 - 1) / 3, frequency (1 - smooth) * 0.1 / 8 + smooth * 0.1
    llama3 = dataclasses.replace(base, rope_scaling="llama3", rope_factor=8.0, rope_original_context=64)
    smooth = (64 / (2 * math.pi / 0.1) - 1) / 3
    torch.testing.assert_close(rope_frequencies(llama3),
                               torch.tensor([1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]))
    model = Transformer(llama3)
    cos, sin = model.rope_cos, model.rope_sin
    angles = torch.arange(base.block_size)[:, None].float() * rope_frequencies(llama3)
    torch.testing.assert_close(cos, torch.cat([angles.cos()] * 2, -1))
    torch.testing.assert_close(sin, torch.cat([angles.sin()] * 2, -1))
