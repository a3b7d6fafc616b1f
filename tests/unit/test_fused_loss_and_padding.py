"""Fused lm_head + cross-entropy, vocabulary padding, and the loop's sync-free step (guard, prefetch, compile)."""

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from llmkit.config.compose import compose
from llmkit.config.schema import TrainConfig
from llmkit.errors import UserError
from llmkit.generate import generate
from llmkit.model.config import ModelConfig
from llmkit.model.hf import config_to_hf, state_dict_from_hf, state_dict_to_hf
from llmkit.model.transformer import Transformer
from llmkit.train import checkpoint as ckpt
from llmkit.train.loop import TrainingError
from llmkit.train.objectives import IGNORE, CausalLM, linear_cross_entropy
from llmkit.train.runtime import use_compile
from tests.unit.test_loop import PoisonAt, make_trainer

V = 61  # padded to 64


def model_cfg(**kw):
    return ModelConfig(**{"vocab_size": V, "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16, **kw})


def batch(seed=0, rows=3, T=16):
    g = torch.Generator().manual_seed(seed)
    ids, labels = torch.randint(0, V, (rows, T), generator=g), torch.randint(0, V, (rows, T), generator=g)
    labels[0, :7] = IGNORE
    labels[2, -3:] = IGNORE
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, objective, b, scale=0.37):
    model.zero_grad()
    loss, _ = objective(model, b)
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"pad_vocab_multiple": 1},
                                {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "tie_embeddings": False}])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_fused_loss_and_gradients_equal_the_plain_path(kw, chunk):
    torch.manual_seed(0)
    model = Transformer(model_cfg(**kw))
    b = batch()
    plain_loss, plain = loss_and_grads(model, CausalLM(), b)
    fused_loss, fused = loss_and_grads(model, CausalLM(fused=True, chunk=chunk), b)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-5)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=2e-6, msg=name)
    assert model.lm_head.weight.grad[V:].abs().max() == 0 if model.cfg.padded_vocab > V else True
    with torch.no_grad():  # evaluation: no gradients are made
        torch.testing.assert_close(CausalLM(fused=True, chunk=chunk)(model, b)[0], plain_loss, rtol=1e-6, atol=1e-5)


def test_linear_cross_entropy_matches_f_cross_entropy_and_skips_ignored_rows():
    torch.manual_seed(1)
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    y = torch.tensor([0, 3, IGNORE, 12, 5, IGNORE, 1, 2, 11])
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE, reduction="sum")
    got = linear_cross_entropy(h, w, y, 13, chunk=4)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w)))
    all_ignored = linear_cross_entropy(h, w, torch.full((9,), IGNORE), 13, chunk=4)
    assert all_ignored.item() == 0.0
    assert torch.autograd.grad(all_ignored, h)[0].abs().max() == 0


def poisoned_padding(model):
    """Large weights in the padded rows: any leak of a padded column would win every argmax."""
    with torch.no_grad():
        model.lm_head.weight[V:] = 50.0 * model.norm.weight.sign()
    return model


def test_padded_rows_are_never_predicted_in_logits_loss_or_generation():
    torch.manual_seed(0)
    model = Transformer(model_cfg())
    assert model.cfg.padded_vocab == 64 and model.lm_head.weight.shape[0] == 64
    assert model.lm_head.weight[V:].abs().max() == 0 and model.tok_emb.weight[V:].abs().max() == 0
    b = batch()
    clean_logits, clean_loss = model(b["input_ids"]), CausalLM()(model, b)[0]
    poisoned_padding(model)
    assert model(b["input_ids"]).shape[-1] == V
    torch.testing.assert_close(model(b["input_ids"]), clean_logits)
    for objective in (CausalLM(), CausalLM(fused=True, chunk=7)):
        torch.testing.assert_close(objective(model, b)[0], clean_loss, rtol=1e-6, atol=1e-5)
    out = generate(model, [[1, 2, 3], [4]], max_new_tokens=10, temperature=0)
    assert all(t < V for row in out.new_tokens for t in row)
    out = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert all(t < V for row in out.new_tokens for t in row)


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoints_hold_no_padding_and_old_unpadded_ones_load(tie, tmp_path):
    torch.manual_seed(0)
    old = Transformer(model_cfg(pad_vocab_multiple=1, tie_embeddings=tie))  # an unpadded (pre-padding) model
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(ckpt.unique_tensors(old.state_dict()), path)
    new = Transformer(model_cfg(tie_embeddings=tie))
    ckpt.load_weights(new, ckpt.read_tensors(path), tmp_path)  # what every command does
    tokens = batch()["input_ids"]
    torch.testing.assert_close(new(tokens), old(tokens), rtol=0, atol=0)
    assert new.lm_head.weight[V:].abs().max() == 0
    assert {k: tuple(v.shape) for k, v in new.state_dict().items()} == {k: tuple(v.shape) for k, v in old.state_dict().items()}
    again = Transformer(model_cfg(tie_embeddings=tie))
    again.load_state_dict(new.state_dict())  # load_state_dict pads too
    torch.testing.assert_close(again(tokens), old(tokens), rtol=0, atol=0)
    safetensors.torch.save_file(ckpt.unique_tensors(new.state_dict()), tmp_path / "new.safetensors")
    assert safetensors.torch.load_file(tmp_path / "new.safetensors")["tok_emb.weight"].shape == (V, 16)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_weight_maps_strip_and_add_the_padding(family):
    pytest.importorskip("transformers")
    extra = {} if family == "gpt2" else {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False}
    torch.manual_seed(0)
    ours = Transformer(model_cfg(**extra))
    hf_sd = state_dict_to_hf(ours.state_dict(), ours.cfg, family)
    embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    assert hf_sd[embed].shape[0] == V and config_to_hf(ours.cfg, family).vocab_size == V
    back = Transformer(model_cfg(**extra))
    back.load_state_dict(state_dict_from_hf(hf_sd, back.cfg, family))
    tokens = batch()["input_ids"]
    torch.testing.assert_close(back(tokens), ours(tokens), rtol=0, atol=0)


def test_bad_padding_multiple_is_a_user_error():
    with pytest.raises(UserError, match="pad_vocab_multiple"):
        model_cfg(pad_vocab_multiple=0)


def test_compile_setting_is_bool_compatible():
    assert TrainConfig(compile=True).compile == "true" and TrainConfig(compile="False").compile == "false"
    assert TrainConfig().compile == "auto"
    assert not use_compile("auto", torch.device("cpu")) and use_compile("auto", torch.device("cuda"))
    with pytest.raises(UserError, match="train.compile"):
        TrainConfig(compile="sometimes")


@pytest.mark.parametrize("value, shown", [("true", "true"), ("True", "true"), ("false", "false"), ("Auto", "auto")])
def test_printed_config_shows_the_normalised_compile_setting(value, shown):
    typed, text = compose("pretrain", None, [f"train.compile={value}"])
    assert typed.train.compile == shown
    assert f"\n  compile: {shown}\n" in text


def records(run_dir, steps=None):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "time")}
            for r in lines if steps is None or r["step"] in steps]


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_reading_only_at_log_steps_changes_no_value(tmp_path):
    every = make_trainer(tmp_path / "every", CausalLM(fused=True), prefetch=False)
    every.run()
    sparse = make_trainer(tmp_path / "sparse", CausalLM(fused=True), log_every=5, prefetch=True)
    sparse.run()
    assert records(tmp_path / "sparse") == records(tmp_path / "every", {3, 5, 6})
    assert all(torch.equal(a, b) for a, b in zip(weights(every).values(), weights(sparse).values(), strict=True))


def test_device_side_skip_equals_the_step_by_step_guard(tmp_path):
    every = make_trainer(tmp_path / "every", PoisonAt({2, 4}), on_nonfinite="skip", max_nonfinite_skips=2)
    every.run()
    sparse = make_trainer(tmp_path / "sparse", PoisonAt({2, 4}), on_nonfinite="skip", max_nonfinite_skips=2,
                          log_every=5, eval_every=6, save_every=6)
    sparse.run()
    assert sparse.state.nonfinite_skips == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(every).values(), weights(sparse).values(), strict=True))
    # A third bad step is one too many: the step-by-step guard stops at step 4 after step 1's update only.
    every = make_trainer(tmp_path / "every3", PoisonAt({2, 3, 4}), on_nonfinite="skip", max_nonfinite_skips=2)
    with pytest.raises(TrainingError, match="step 4"):
        every.run()
    sparse = make_trainer(tmp_path / "sparse3", PoisonAt({2, 3, 4}), on_nonfinite="skip", max_nonfinite_skips=2,
                          log_every=5, eval_every=6, save_every=6)
    with pytest.raises(TrainingError, match="step 4"):
        sparse.run()
    assert sparse.state.step == 5 and sparse.state.nonfinite_skips == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(every).values(), weights(sparse).values(), strict=True))


def test_stop_at_a_bad_step_read_later_leaves_the_parameters_of_the_step_before(tmp_path):
    reference = make_trainer(tmp_path / "ref", CausalLM(), max_steps=1)
    reference.run()
    after_step_1 = weights(reference)
    trainer = make_trainer(tmp_path / "t", PoisonAt({2}), log_every=5, eval_every=6, save_every=6)
    with pytest.raises(TrainingError, match=r"step 2: non-finite.*none yet"):
        trainer.run()
    assert trainer.state.step == 5  # read at step 5; steps 3-5 were skipped on the device
    assert all(torch.equal(after_step_1[k], v) for k, v in weights(trainer).items())


def test_fused_loss_under_bf16_autocast_is_as_close_to_fp32_as_the_plain_path():
    torch.manual_seed(0)
    model = Transformer(model_cfg())
    b = batch()
    _, ref = loss_and_grads(model, CausalLM(), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = loss_and_grads(model, CausalLM(), b)
        _, fused = loss_and_grads(model, CausalLM(fused=True, chunk=5), b)
    for name in ("tok_emb.weight", "blocks.0.attn.q_proj.weight", "blocks.0.mlp.down_proj.weight", "norm.weight"):
        assert fused[name].dtype == torch.float32
        fused_err, plain_err = ((g[name] - ref[name]).norm() / ref[name].norm() for g in (fused, plain))
        assert fused_err < max(2 * plain_err, 0.02), name
