"""Sampling: cached batched generation equals naive recomputation; filters; seeds; eos; validation."""

import math

import pytest
import torch

from llmkit.errors import UserError
from llmkit.generate import generate, positions_from_mask, sample_next, top_k_filter, top_p_filter
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

V = 53
INF = float("-inf")


def make(style: str) -> Transformer:
    torch.manual_seed(1)
    if style == "gpt2":
        cfg = ModelConfig(vocab_size=V, block_size=40, n_layer=2, n_head=4, d_model=32)
    else:
        cfg = ModelConfig(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                          norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False, bias=False)
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights: sharper, more varied greedy continuations
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval()


def greedy_reference(model: Transformer, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """One prompt, no padding, no cache: recompute the whole sequence for every new token."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            seq.append(nxt)
    return out


PROMPTS = [[3, 14, 15, 9, 2, 6], [5], [35, 8, 9, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_cached_batched_greedy_equals_recomputation(style):
    model = make(style)
    res = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    expected = [greedy_reference(model, p, 12) for p in PROMPTS]
    assert res.new_tokens == expected
    assert len({tuple(r) for r in expected}) == len(PROMPTS)  # rows differ: the test can tell rows apart
    assert res.ended_with_eos == [False] * 4
    P = max(map(len, PROMPTS))
    assert res.prompt_len == P and res.tokens.shape == (4, P + 12) and res.attention_mask.shape == (4, P + 12)
    for i, p in enumerate(PROMPTS):
        assert res.tokens[i, P - len(p) : P].tolist() == p
        assert res.attention_mask[i].tolist() == [0] * (P - len(p)) + [1] * (len(p) + 12)
        assert res.tokens[i, P:].tolist() == expected[i]


def test_eos_stops_a_row_and_all_done_stops_early():
    model = make("llama")
    plain = [greedy_reference(model, p, 10) for p in PROMPTS]
    k = next(k for k in range(2, 10) if plain[0][k] not in plain[0][:k])  # row 0 first emits it at step k
    eos = plain[0][k]
    res = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos, pad_id=0)
    for i, p in enumerate(PROMPTS):
        ref = greedy_reference(model, p, 10, eos=eos)
        hit = ref[-1] == eos
        assert res.ended_with_eos[i] == hit
        assert res.new_tokens[i] == (ref[:-1] if hit else ref)
    assert res.ended_with_eos[0] and res.new_tokens[0] == plain[0][:k]
    assert not all(res.ended_with_eos)  # some row ran on after row 0 stopped
    P = res.prompt_len
    assert res.tokens[0, P + k].item() == eos and res.attention_mask[0, P + k].item() == 1
    assert res.tokens.shape[1] > P + k + 1
    assert (res.tokens[0, P + k + 1 :] == 0).all() and (res.attention_mask[0, P + k + 1 :] == 0).all()

    # Every row stops at once when eos is whatever each row produces first: one column only.
    firsts = [plain[i][0] for i in range(4)]
    res = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_id=firsts)
    assert res.tokens.shape[1] == res.prompt_len + 1 and all(res.ended_with_eos)
    assert res.new_tokens == [[], [], [], []]


def test_mask_is_passed_only_once_some_key_is_padding():
    """Unpadded prompts take the causal fast path (mask None) until a row ends; outputs stay the reference's."""
    model = make("llama")
    seen = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("attention_mask") is None), with_kwargs=True)
    same_len = [[3, 14, 15, 9], [35, 8, 9, 7], [1, 2, 3, 4]]
    plain = [greedy_reference(model, p, 8) for p in same_len]
    seen.clear()
    res = generate(model, same_len, max_new_tokens=8, temperature=0)
    assert res.new_tokens == plain and seen == [True] * 8  # prefill + 7 steps, never a mask
    k = next(k for k in range(1, 7) if plain[0][k] not in plain[0][:k] and all(plain[0][k] not in r[:8] for r in plain[1:]))
    seen.clear()
    res = generate(model, same_len, max_new_tokens=8, temperature=0, eos_id=plain[0][k], pad_id=0)
    assert res.new_tokens == [plain[0][:k], *plain[1:]] and res.ended_with_eos == [True, False, False]
    assert seen == [True] * (k + 1) + [False] * (7 - k)  # row 0 ends at step k: every later step masks it
    seen.clear()
    generate(model, PROMPTS, max_new_tokens=3, temperature=0)
    assert seen == [False] * 3  # left padding: masked from the prefill on


def test_on_tokens_streams_each_step():
    model = make("gpt2")
    seen = []
    res = generate(model, PROMPTS[:2], max_new_tokens=5, temperature=0,
                   on_tokens=lambda step, ids, done: seen.append((step, ids.tolist(), done.tolist())))
    assert [s for s, _, _ in seen] == list(range(5))
    assert [[ids[r] for _, ids, _ in seen] for r in range(2)] == res.new_tokens
    assert all(done == [False, False] for _, _, done in seen)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[INF, 3.0, 2.0, INF], [INF, INF, 5.0, 4.0]]
    assert torch.equal(top_k_filter(logits, 4), logits)


def test_top_p_filter():
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert keep(0.75) == [False, True, False, True]  # 0.5 + 0.3
    assert keep(0.9) == [True, True, False, True]  # 0.5 + 0.3 + 0.15
    assert keep(1.0) == [True, True, True, True]
    kept = top_p_filter(logits, 0.75)
    assert kept[0, 1].item() == pytest.approx(math.log(0.5), abs=1e-6)  # kept logits unchanged


def test_sample_next_greedy_and_top_k_one():
    logits = torch.randn(5, V)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=2.0, top_k=1, generator=g), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, generator=g), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.015, rtol=0)
    sharp = torch.bincount(sample_next(logits, temperature=0.5, generator=g), minlength=4).float() / 20000
    expected = torch.tensor([0.49, 0.04, 0.01, 0.0]) / 0.54  # p**2, renormalised
    torch.testing.assert_close(sharp, expected, atol=0.015, rtol=0)


def test_same_seed_same_samples():
    model = make("llama")
    kw = dict(max_new_tokens=15, temperature=1.0, top_p=0.95)
    a = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    assert a.new_tokens == b.new_tokens and torch.equal(a.tokens, b.tokens)
    assert a.new_tokens != c.new_tokens


def test_training_flag_restored_and_outputs_usable_for_training():
    model = make("gpt2").train()
    res = generate(model, PROMPTS, max_new_tokens=3, temperature=0)
    assert model.training
    positions = positions_from_mask(res.attention_mask)
    model(res.tokens, positions=positions, attention_mask=res.attention_mask).sum().backward()  # not inference tensors
    assert model.tok_emb.weight.grad is not None


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


@pytest.mark.parametrize(
    "prompts, kw, match",
    [
        ([[1, 2]], dict(top_p=0.0), "top_p"),
        ([[1, 2]], dict(top_p=1.5), "top_p"),
        ([[1, 2]], dict(temperature=-0.1), "temperature"),
        ([[1, 2]], dict(top_k=0), "top_k"),
        ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([], {}, "at least one prompt"),
        ([[1] * 35], dict(max_new_tokens=6), r"prompt 0 has 35 tokens.*block_size=40"),
        ([[1, V]], {}, "outside the vocabulary"),
        ([[1, 2]], dict(temperature=1e-39), r"temperature must be 0 \(greedy\) or at least 0.0001"),
    ],
)
def test_bad_arguments_raise_user_error(prompts, kw, match):
    model = make("gpt2")
    with pytest.raises(UserError, match=match):
        generate(model, prompts, **{"max_new_tokens": 4, **kw})


def test_a_prompts_file_with_a_bom_and_crlf_gives_clean_prompts(tmp_path):
    """Editors on Windows write a BOM and CRLF: neither may reach the first prompt (it changed the answer)."""
    from llmkit.commands.generate import read_prompts
    from llmkit.config.schema import GenerateConfig

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffWrite abc in capital letters.\r\n\r\nWrite lomab.\r\n".encode())
    assert read_prompts(GenerateConfig(prompts_file=str(path))) == ["Write abc in capital letters.", "Write lomab."]


def test_a_stop_string_that_is_a_special_token_stops_as_that_token(tiny_run, monkeypatch, capsys):
    """The printed text has no special tokens, so sampling.stop=['<|im_end|>'] never matched: it is now a stop id,
    beside the eos id; other stop strings still cut the text."""
    import llmkit.generate
    from llmkit.commands.generate import run
    from llmkit.config.compose import compose

    cfg, resolved = compose("generate", None, [f"run={tiny_run}", "prompt=Return the", "stream=false",
                                               "sampling.stop=['<|im_end|>','###']"])
    seen = {}

    def fake_generate(model, prompts, *, eos_id, **kw):
        seen["eos_id"] = eos_id
        ids = tokenizer.encode("one two ### three").ids
        return llmkit.generate.GenerationResult(torch.tensor([ids]), torch.ones(1, len(ids)), 0, [ids], [False])

    from llmkit.tokenizer.bpe import load_tokenizer

    tokenizer = load_tokenizer(tiny_run / "tokenizer.json")
    monkeypatch.setattr(llmkit.generate, "generate", fake_generate)
    assert run(cfg, resolved) == 0
    assert seen["eos_id"] == [tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")]
    assert capsys.readouterr().out.startswith("Return theone two \n")
