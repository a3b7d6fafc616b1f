"""Prefix and prompt tuning: exact prompt semantics, masks (causal, packed, padded), KV-cache generation."""

import copy

import pytest
import torch

from llmkit.errors import UserError
from llmkit.generate import generate
from llmkit.peft.apply import apply_peft
from llmkit.peft.config import PeftConfig
from tests.unit.peft_testing import STYLES, make_base, perturb_adapter, tokens

VARIANTS = [("prefix", {}), ("prefix", {"prefix_projection": True}), ("prompt", {})]


class SpaceTokenizer:
    """Stands in for a tokenizers.Tokenizer: 'ids' are the text's space-separated integers."""

    class Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str) -> "SpaceTokenizer.Encoding":
        return self.Encoding([int(t) for t in text.split()])


def adapted(style: str, method: str, seed: int = 0, sharpen: float = 1.0, **kw):
    model = make_base(style, seed=seed, sharpen=sharpen)
    apply_peft(model, PeftConfig(method=method, num_virtual_tokens=5, **kw))
    perturb_adapter(model)
    return model


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method, kw", VARIANTS)
def test_shapes_and_full_context(style, method, kw):
    model = adapted(style, method, **kw)
    x = tokens(3, 32)  # the whole block_size: virtual tokens take no context
    out = model(x)
    assert out.shape == (3, 32, 64) and torch.isfinite(out).all()
    assert model(x, return_hidden=True).shape == (3, 32, 32)
    assert not torch.allclose(out, make_base(style)(x), atol=1e-3)  # the prefix matters


@pytest.mark.parametrize("style", STYLES)
def test_prompt_tuning_equals_prepending_the_prompt_tokens(style):
    """Initialised from a text, the soft prompt computes what the base computes on text + input, the
    input keeping its own positions (RoPE: relative, so plain prepending is the same)."""
    base = make_base(style)
    model = copy.deepcopy(base)
    prompt = [3, 14, 15, 9, 2]
    apply_peft(model, PeftConfig(method="prompt", num_virtual_tokens=5, prompt_init_text="3 14 15 9 2"),
               tokenizer=SpaceTokenizer())
    x = tokens(2, 10)
    full = torch.cat((torch.tensor([prompt, prompt]), x), dim=1)  # (2, 15)
    positions = None if style == "llama" else torch.cat((torch.arange(5), torch.arange(10)))[None]
    expected = base(full, positions=positions)[:, 5:]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_prompt_init_text_repeats_to_length_and_needs_a_tokenizer():
    model = make_base("llama")
    apply_peft(model, PeftConfig(method="prompt", num_virtual_tokens=7, prompt_init_text="4 5 6"),
               tokenizer=SpaceTokenizer())
    expected = model.tok_emb.weight[[4, 5, 6, 4, 5, 6, 4]]
    torch.testing.assert_close(model.prompt_tuning.embedding.detach(), expected)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        apply_peft(make_base("llama"), PeftConfig(method="prompt", prompt_init_text="4"))


def test_too_many_virtual_tokens_is_a_user_error_that_leaves_the_model_alone():
    model = make_base("gpt2")
    with pytest.raises(UserError, match="num_virtual_tokens=32 must be below"):
        apply_peft(model, PeftConfig(method="prefix", num_virtual_tokens=32))
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "peft_state")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method, kw", VARIANTS)
def test_packed_documents_each_see_the_prefix(style, method, kw):
    model = adapted(style, method, **kw)
    a, b = tokens(1, 7, seed=1), tokens(1, 5, seed=2)
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.cat((torch.arange(7), torch.arange(5)))[None]
    out = model(packed, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :7], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 7:], model(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method, kw", VARIANTS)
def test_left_padded_row_matches_the_row_alone(style, method, kw):
    model = adapted(style, method, **kw)
    short, long = tokens(1, 6, seed=3), tokens(1, 9, seed=4)
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(batch, positions=positions, attention_mask=mask)
    torch.testing.assert_close(out[0, 3:], model(short)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(long)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method, kw", VARIANTS)
def test_kv_cache_steps_match_the_full_forward(style, method, kw):
    model = adapted(style, method, **kw)
    x = tokens(2, 12)
    full = model(x)
    cache = model.new_cache(2, 12)
    steps = [model(x[:, :8], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12  # the cache holds the real tokens only


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """No cache, no padding: recompute the whole sequence for each new token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


PROMPTS = [[3, 14, 15, 9, 2, 6], [5], [35, 8, 9, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method, kw", VARIANTS)
def test_cached_batched_generation_equals_recomputation(style, method, kw):
    model = adapted(style, method, sharpen=8.0, **kw)
    res = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    expected = [greedy_reference(model, p, 10) for p in PROMPTS]
    assert res.new_tokens == expected
    base = make_base(style, sharpen=8.0)
    assert generate(base, PROMPTS, max_new_tokens=10, temperature=0).new_tokens != expected  # prefix matters
