"""Compiled decoding: decode_step equals the full forward; generate(compile=True) equals eager generation."""

import gc
import shutil
import warnings
import weakref

import pytest
import torch

import llmkit.generate as generation
from llmkit.errors import UserError
from llmkit.generate import generate, positions_from_mask
from llmkit.model.kv_cache import StaticKVCache
from llmkit.peft.apply import apply_peft
from llmkit.peft.config import PeftConfig
from tests.unit.peft_testing import make_base, perturb_adapter
from tests.unit.test_generate import PROMPTS, make

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile (inductor) needs a C++ compiler on CPU")


@pytest.mark.parametrize("style", ["gpt2", "llama"])  # llama: RoPE and grouped-query attention (4 heads, 2 kv)
def test_decode_step_equals_full_forward_with_left_padding(style):
    """Prefill, then decode_step token by token over a static cache: each step's logits are the full forward's."""
    model = make(style)
    P, N = max(map(len, PROMPTS)), 6
    tokens = torch.randint(1, 53, (len(PROMPTS), P + N), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, : P - len(prompt)] = 0
        mask[row, : P - len(prompt)] = 0
    positions = positions_from_mask(mask)
    with torch.no_grad():
        full = model(tokens, positions=positions, attention_mask=mask)  # (B, P + N, V)
        cache = model.new_cache(len(PROMPTS), P + N)
        model(tokens[:, :P], positions=positions[:, :P], attention_mask=mask[:, :P], cache=cache)
        static = StaticKVCache(cache)
        step_mask = torch.zeros_like(mask)
        step_mask[:, :P] = mask[:, :P]
        for col in range(P, P + N):
            step_mask[:, col] = 1
            logits = model.decode_step(tokens[:, col : col + 1], positions[:, col : col + 1], step_mask, static)
            static.advance()
            torch.testing.assert_close(logits, full[:, col], rtol=1e-5, atol=1e-5)
    for layer in range(model.cfg.n_layer):  # the steps wrote their keys where the chunked forward would have
        reference = model.new_cache(len(PROMPTS), P + N)
        with torch.no_grad():
            model(tokens, positions=positions, attention_mask=mask, cache=reference)
        torch.testing.assert_close(cache.k[layer], reference.k[layer], rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_compiled_generation_equals_eager(style):
    """Left padding, eos ending rows at different steps, then seeded sampling: the same tokens either way."""
    model = make(style)
    eager = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    eos = eager.new_tokens[0][3]  # row 0 ends at its 4th token; others run on or end elsewhere
    kw = dict(max_new_tokens=10, temperature=0, eos_id=eos, pad_id=0)
    eager, compiled = generate(model, PROMPTS, **kw), generate(model, PROMPTS, compile=True, **kw)
    assert compiled.new_tokens == eager.new_tokens and compiled.ended_with_eos == eager.ended_with_eos
    assert eager.ended_with_eos[0] and not all(eager.ended_with_eos)
    assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(compiled.attention_mask, eager.attention_mask)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, eos_id=eos, pad_id=0)
    eager = generate(model, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    compiled = generate(model, PROMPTS, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    assert compiled.new_tokens == eager.new_tokens  # the second call reuses the compiled step (same shapes)


@needs_compiler
def test_compiled_step_serves_each_model_its_own_weights_and_holds_none_alive():
    """Two models of one shape in turn (the later steps skip dynamo's guards): each gets its own tokens."""
    first, second = make("gpt2"), make("gpt2")
    with torch.no_grad():
        second.lm_head.weight.mul_(-1)  # tied: embeddings too; a different greedy path
    kw = dict(max_new_tokens=8, temperature=0)
    expected = [generate(m, PROMPTS, **kw).new_tokens for m in (first, second)]
    assert expected[0] != expected[1]
    for _ in range(2):
        assert [generate(m, PROMPTS, compile=True, **kw).new_tokens for m in (first, second)] == expected
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None


@needs_compiler
def test_nearby_lengths_share_a_compiled_step_and_the_recompile_limit_falls_back_to_eager():
    torch._dynamo.reset()
    model = make("llama")
    kw = dict(max_new_tokens=5, temperature=0)
    shorter = [p[:4] for p in PROMPTS]  # 9 columns instead of 15: the same 32-slot cache
    with torch._dynamo.config.patch(recompile_limit=1):  # the config's own patch (pytest's monkeypatch deletes it)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            results = [generate(model, prompts, compile=True, **kw) for prompts in (PROMPTS, shorter)]
        with pytest.warns(RuntimeWarning, match="recompile limit"):  # another batch size needs a second entry
            results.append(generate(model, PROMPTS[:2], compile=True, **kw))
    for prompts, result in zip((PROMPTS, shorter, PROMPTS[:2]), results):
        assert result.new_tokens == generate(model, prompts, **kw).new_tokens
        assert result.tokens.shape[1] == max(map(len, prompts)) + 5  # the unused cache columns are trimmed
    torch._dynamo.reset()


@needs_compiler
@pytest.mark.parametrize("method", ["lora", "ia3"])  # a module swap; hooks on the MLPs' submodules
def test_compiled_generation_with_peft_adapters(method):
    model = make_base("llama")
    apply_peft(model, PeftConfig(method=method))
    perturb_adapter(model, std=1.0)
    kw = dict(max_new_tokens=6, temperature=0)
    eager = generate(model, PROMPTS, **kw).new_tokens
    assert eager != generate(make_base("llama"), PROMPTS, **kw).new_tokens  # the adapter changes the tokens
    assert generate(model, PROMPTS, compile=True, **kw).new_tokens == eager


def test_compile_refuses_models_with_forward_hooks():
    model = make("gpt2")
    apply_peft(model, PeftConfig(method="prefix", num_virtual_tokens=2))
    with pytest.raises(UserError, match="forward hooks .*compile=false"):
        generate(model, PROMPTS, max_new_tokens=2, temperature=0, compile=True)


def test_compile_failure_is_a_user_error(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: failing)
    monkeypatch.setattr(generation, "_COMPILED_STEPS", {})
    with pytest.raises(UserError, match="No working C\\+\\+ compiler found.*compile=false"):
        generate(make("gpt2"), PROMPTS, max_new_tokens=3, temperature=0, compile=True)
