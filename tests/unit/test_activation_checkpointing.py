"""train.activation_checkpointing: the same loss and gradients, the same parameter names, less memory held."""

import pytest
import torch

from llmkit.errors import UserError
from llmkit.peft.apply import apply_peft
from llmkit.peft.config import PeftConfig
from llmkit.train.runtime import set_activation_checkpointing
from tests.unit.peft_testing import METHODS, STYLES, lm_loss, make_base, tokens


def loss_and_grads(model: torch.nn.Module, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # dropout draws the same mask in the forward and in the recomputation
    loss = lm_loss(model, tokens(batch=3, length=16))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model: torch.nn.Module) -> None:
    loss_plain, grads_plain = loss_and_grads(model, False)
    loss_ckpt, grads_ckpt = loss_and_grads(model, True)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys() and grads_plain
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_blocks_give_identical_loss_and_gradients(style, dropout):
    model = make_base(style, dropout=dropout).train()
    names = list(model.state_dict())
    assert_same(model)
    assert list(model.state_dict()) == names  # no wrapper modules: checkpoints load unchanged


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("prefix", "prompt")])
def test_checkpointing_applies_to_peft_models(method):
    model = make_base("llama")
    apply_peft(model, PeftConfig(method=method))
    set_activation_checkpointing(model, True)  # what the loop does with train.activation_checkpointing=true
    assert model.activation_checkpointing
    assert_same(model.train())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_refuse_checkpointing(method):
    model = make_base("gpt2")
    apply_peft(model, PeftConfig(method=method))
    with pytest.raises(UserError, match=f"peft={method}"):
        set_activation_checkpointing(model, True)
    set_activation_checkpointing(model, False)


def test_checkpointing_recomputes_in_backward_and_is_off_for_eval_and_generation():
    model = make_base("gpt2").train()
    model.activation_checkpointing = True
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    lm_loss(model, tokens()).backward()
    assert len(calls) == 2  # the forward, then the recomputation during backward
    calls.clear()
    with torch.no_grad():
        model(tokens())
    model.eval()
    model(tokens())
    assert len(calls) == 2  # once each: nothing to recompute without gradients or in eval mode
