"""PPO / DPO / reward-model math against values worked out by hand (written out, not recomputed)."""

import math

import pytest
import torch

from llmkit.rl import losses
from llmkit.rl.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    leave_one_out_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)
from llmkit.rl.losses import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprob,
)

LOG2 = 0.6931471805599453
F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, t(expected, actual.dtype), atol=tol, rtol=0)


# ---------------------------------------------------------------- masked statistics


X = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]]
M = [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_masked_mean_ignores_padding():
    x, m = t(X), torch.tensor(M, dtype=torch.bool)
    close(masked_mean(x, m), 3.0)  # (1+2+3+4+5)/5; the 100 is padding
    close(masked_mean(x, m, dim=1), [2.0, 4.5])
    close(masked_mean(x, t(M)), 3.0)  # 0/1 float mask works the same
    x_garbage = x.clone()
    x_garbage[0, 3] = float("nan")
    close(masked_mean(x_garbage, m), 3.0)  # nan on padding is never read
    close(masked_mean(x, torch.zeros(2, 4, dtype=torch.bool)), 0.0)  # no valid token: 0, not nan


def test_masked_var():
    x, m = t(X), t(M)
    close(masked_var(x, m), 2.5)  # deviations -2,-1,0,1,2: 10 / 4
    close(masked_var(x, m, unbiased=False), 2.0)  # 10 / 5


def test_masked_whiten_mean0_var1_and_padding_zero():
    x, m = t(X), t(M)
    w = masked_whiten(x, m)
    s = 1 / math.sqrt(2.5)
    close(w, [[-2 * s, -s, 0.0, 0.0], [s, 2 * s, 0.0, 0.0]], tol=1e-8)
    close(masked_mean(w, m), 0.0)
    close(masked_var(w, m), 1.0, tol=1e-7)
    assert w[0, 3] == 0 and w[1, 2] == 0 and w[1, 3] == 0
    kept = masked_whiten(x, m, shift_mean=False)  # scale only: mean 3 kept
    close(kept, [[3 - 2 * s, 3 - s, 3.0, 0.0], [3 + s, 3 + 2 * s, 0.0, 0.0]], tol=1e-8)


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError):
        masked_mean(t(X), t([1, 1, 1, 0]))


# ---------------------------------------------------------------- GAE


def test_gae_1x3():
    # gamma 0.9, lam 0.8 (gamma*lam 0.72); V after the end is 0.
    # t2: d = 2 - 1.5 = 0.5;             A2 = 0.5
    # t1: d = 0 + 0.9*1.5 - 1.0 = 0.35;  A1 = 0.35 + 0.72*0.5 = 0.71
    # t0: d = 1 + 0.9*1.0 - 0.5 = 1.4;   A0 = 1.4 + 0.72*0.71 = 1.9112
    adv, ret = gae(t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), t([[1, 1, 1]]), gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])


def test_gae_2x4_masked():
    # gamma = lam = 0.5 (gamma*lam 0.25). Row 1 has 2 valid tokens; its padding holds garbage.
    # row 0: t3 d=1-0.8=0.2 A=0.2 | t2 d=0.4-0.6=-0.2 A=-0.2+0.05=-0.15
    #        t1 d=0.3-0.4=-0.1 A=-0.1-0.0375=-0.1375 | t0 d=0.2-0.2=0 A=-0.034375
    # row 1: t1 d=-1-2=-3 A=-3 (terminal) | t0 d=0.5+0.5*2-1=0.5 A=0.5-0.75=-0.25
    rewards = t([[0.0, 0.0, 0.0, 1.0], [0.5, -1.0, 9.0, float("nan")]])
    values = t([[0.2, 0.4, 0.6, 0.8], [1.0, 2.0, 7.0, float("inf")]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.034375, -0.1375, -0.15, 0.2], [-0.25, -3.0, 0.0, 0.0]])
    close(ret, [[0.165625, 0.2625, 0.45, 1.0], [0.75, -1.0, 0.0, 0.0]])
    assert not adv.requires_grad


def test_gae_rejects_holes_and_bad_args():
    ones = torch.ones(1, 4, dtype=F64)
    with pytest.raises(ValueError):
        gae(ones, ones, t([[1, 0, 1, 0]]), 0.9, 0.9)
    with pytest.raises(ValueError):
        gae(ones, ones, ones, 1.5, 0.9)
    # masked prompt tokens in front of the response are fine
    adv, _ = gae(ones, ones, t([[0, 1, 1, 0]]), 1.0, 1.0)
    close(adv, [[0.0, 1.0, 0.0, 0.0]])  # t2: 1-1=0; t1: 1+1-1 + 0 = 1


# ---------------------------------------------------------------- KL and rewards


def test_leave_one_out_advantages_by_hand():
    # two prompts x 2 responses; returns (sum of valid rewards): 1.5, -0.5 | 2.0, 0.0 (row 3's padding is garbage)
    rewards = t([[0.5, 1.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = leave_one_out_advantages(rewards, mask, group=2)
    close(adv, [[2.0, 2.0, 2.0], [-2.0, 0.0, 0.0], [2.0, 2.0, 0.0], [-2.0, 0.0, 0.0]])
    # group of 3: return 3 minus the mean of (0, 0) = 3; each 0 minus the mean of (3, 0) = -1.5
    adv3 = leave_one_out_advantages(t([[3.0], [0.0], [0.0]]), torch.ones(3, 1, dtype=torch.bool), group=3)
    close(adv3, [[3.0], [-1.5], [-1.5]])
    with pytest.raises(ValueError, match="groups"):
        leave_one_out_advantages(rewards, mask, group=3)


def test_kl_per_token_values():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    close(kl_per_token(logp, ref, "k1"), [LOG2])  # log 0.5 - log 0.25
    close(kl_per_token(logp, ref, "k2"), [0.2402265069591007])  # 0.5 * log(2)^2
    close(kl_per_token(logp, ref, "k3"), [0.1931471805599453])  # r = 0.5: -0.5 + log 2
    for kind in ("k1", "k2", "k3"):
        close(kl_per_token(ref, ref, kind), [0.0])
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k4")


def test_token_rewards_score_on_last_valid_token():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    rewards = token_rewards(t([1.0, 2.0, 3.0]), kl, mask, beta=0.5)
    close(rewards, [[-0.05, -0.1, 0.85], [1.8, 0.0, 0.0], [0.0, 3.0, 0.0]])
    with pytest.raises(ValueError):  # a row without valid tokens would lose its score
        token_rewards(t([1.0]), t([[0.1, 0.2]]), t([[0, 0]]), beta=0.5)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl 6.6: err = 0.1 -> beta = 0.1 * (1 + 0.1 * 256 / 10000) = 0.100256
    assert ctl.update(6.6, 256) == pytest.approx(0.100256, abs=1e-15)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl 9: err 0.5 clipped to 0.2 -> 0.1 * 1.00512 = 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512, abs=1e-15)
    # kl 3: err -0.5 clipped to -0.2 -> 0.100512 * 0.99488 = 0.09999737856
    assert ctl.update(3.0, 256) == pytest.approx(0.09999737856, abs=1e-15)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=500)
    for kl in (5.0, 1.0, 4.3):
        ctl.update(kl, 32)
    state = ctl.state_dict()
    resumed = AdaptiveKLController(0.2, target=4.0, horizon=500)
    resumed.load_state_dict(state)
    assert resumed.beta == ctl.beta  # exact
    assert resumed.update(7.0, 32) == ctl.update(7.0, 32)
    fixed = FixedKLController(0.3)
    fixed.load_state_dict({"kind": "fixed", "beta": 0.7})
    assert fixed.beta == 0.7
    with pytest.raises(ValueError):
        fixed.load_state_dict(state)  # an adaptive state into a fixed controller


# ---------------------------------------------------------------- PPO losses


def test_ppo_ratio_one_on_first_minibatch():
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]]).requires_grad_()
    adv = t([[1.0, -2.0, 0.5], [3.0, 1.5, 100.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, logp.detach().clone(), adv, mask, clip_eps=0.2)
    close(loss, -0.8)  # -mean(1, -2, 0.5, 3, 1.5) = -4 / 5
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    loss.backward()
    close(logp.grad, [[-0.2, 0.4, -0.1], [-0.6, -0.3, 0.0]])  # -A / 5 on valid tokens


def test_ppo_clipping_direction():
    # eps 0.2; ratios 1.5 and 0.5 for positive and negative advantages:
    # A=+1 r=1.5: max(-1.5, -1.2) = -1.2 clipped (no gradient)
    # A=+1 r=0.5: max(-0.5, -0.8) = -0.5 unclipped, grad -A*r/4 = -0.125
    # A=-1 r=0.5: max(0.5, 0.8)   =  0.8 clipped (no gradient)
    # A=-1 r=1.5: max(1.5, 1.2)   =  1.5 unclipped, grad -A*r/4 = 0.375
    # 5th token is padding with a huge ratio: ignored.
    old = t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logp = (old + t([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), 10.0]])).requires_grad_()
    adv = t([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(loss, 0.15)  # (-1.2 - 0.5 + 0.8 + 1.5) / 4
    close(stats["clipfrac"], 0.5)
    # k3 of r=1.5: 0.5 - log 1.5; of r=0.5: -0.5 + log 2; mean of two of each
    close(stats["approx_kl"], (0.09453489189183562 + 0.1931471805599453) / 2)
    loss.backward()
    close(logp.grad, [[0.0, -0.125, 0.0, 0.375, 0.0]])


def test_ppo_value_loss_clipping():
    # old 1.0, return 2.0, eps 0.2
    # v=1.5: clip to 1.2; errors 0.25 vs 0.64 -> 0.64 (clipped, no gradient)
    # v=0.5: clip to 0.8; errors 2.25 vs 1.44 -> 2.25 (unclipped), grad 0.5*2*(0.5-2)/2 = -0.75
    values = t([[1.5, 0.5, 3.0]]).requires_grad_()
    old, ret, mask = t([[1.0, 1.0, 0.0]]), t([[2.0, 2.0, 0.0]]), t([[1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, ret, mask, clip_eps=0.2)
    close(loss, 0.7225)  # 0.5 * (0.64 + 2.25) / 2
    close(stats["clipfrac"], 0.5)
    loss.backward()
    close(values.grad, [[0.0, -0.75, 0.0]])
    # inside the clip range both terms agree: 0.5 * (1.1 - 2)^2 = 0.405
    loss, stats = ppo_value_loss(t([[1.1]]), t([[1.0]]), t([[2.0]]), t([[1]]), clip_eps=0.2)
    close(loss, 0.405)
    close(stats["clipfrac"], 0.0)


def test_explained_variance():
    ret = t([[1.0, 2.0, 4.0], [3.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    close(explained_variance(ret.clone(), ret, mask), 1.0)
    values = ret.clone()
    values[1, 2] = 50.0  # padding: ignored
    close(explained_variance(values, ret, mask), 1.0)
    close(explained_variance(torch.full_like(ret, 7.0), ret, mask), 0.0)  # a constant explains nothing
    assert torch.isnan(explained_variance(ret, torch.ones_like(ret), mask))


# ---------------------------------------------------------------- reward model and DPO


def test_bradley_terry_loss():
    rc, rr = t([0.3, -1.0]).requires_grad_(), t([0.3, -1.0]).requires_grad_()
    loss, stats = bradley_terry_loss(rc, rr)
    close(loss, 2 * LOG2)  # a sum over the 2 pairs
    close(stats["accuracy"], 0.0)  # ties are not correct
    loss.backward()
    close(rc.grad, [-0.5, -0.5])  # -sigmoid(0): raising the chosen reward lowers the loss
    close(rr.grad, [0.5, 0.5])
    # margins 2 and -1: log(1+e^-2) + log(1+e)
    loss, stats = bradley_terry_loss(t([3.0, 0.0]), t([1.0, 1.0]))
    close(loss, 0.1269280110429726 + 1.3132616875182228)
    close(stats["accuracy"], 0.5)
    close(stats["margin"], 0.5)
    close(bradley_terry_loss(t([1.0]), t([0.0]), margin=t([1.0]))[0], LOG2)  # margin eats the gap
    close(bradley_terry_loss(t([1.0]), t([1.0]), centering=0.01)[0], LOG2 + 0.04)  # + 0.01 * 2^2


def test_dpo_log2_when_policy_equals_reference():
    logps = t([-5.0, -7.5, -2.0])
    loss, stats = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    close(loss, 3 * LOG2)
    close(stats["margin"], 0.0)
    close(stats["accuracy"], 0.0)


def test_dpo_by_hand_and_direction():
    # h = (-1 + 1.5) - (-2 + 1.5) = 1; beta 0.1: -logsigmoid(0.1) = log(1 + e^-0.1)
    pc = t([-1.0]).requires_grad_()
    loss, stats = dpo_loss(pc, t([-2.0]), t([-1.5]), t([-1.5]), beta=0.1)
    close(loss, 0.6443966600735709)
    close(stats["rewards_chosen"], 0.05)
    close(stats["rewards_rejected"], -0.05)
    close(stats["margin"], 0.1)
    close(stats["accuracy"], 1.0)
    loss.backward()
    assert pc.grad.item() < 0  # raising the chosen log-ratio lowers the loss
    higher, _ = dpo_loss(t([-0.5]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.1)
    assert higher.item() < loss.item()
    # label smoothing 0.1: 0.9*log(1+e^-0.1) + 0.1*log(1+e^0.1) = log(1+e^-0.1) + 0.1*0.1
    smooth, _ = dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.1, label_smoothing=0.1)
    close(smooth, 0.6543966600735709)


def test_ipo_by_hand():
    args = (t([-1.0, -1.0]), t([-2.0, -3.0]), t([-1.5, -1.0]), t([-1.5, -1.0]))
    # h = 1 and 2; beta 0.1 -> target 1/(2*0.1) = 5: (1-5)^2 + (2-5)^2 = 16 + 9
    close(dpo_loss(*args, beta=0.1, kind="ipo")[0], 25.0)
    # beta 0.5 -> target 1: 0 + 1
    close(dpo_loss(*args, beta=0.5, kind="ipo")[0], 1.0)
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.1, kind="hinge-ish")
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.1, kind="ipo", label_smoothing=0.1)


def test_sequence_logprob_sum_and_average():
    logp = t([[-1.0, -2.0, -3.0], [-0.5, -9.0, float("-inf")]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    close(sequence_logprob(logp, mask), [-6.0, -0.5])
    close(sequence_logprob(logp, mask, average=True), [-2.0, -0.5])


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_from_logits_by_hand():
    ln3 = math.log(3.0)
    logits = t([[[0.0, 0.0, 2 * ln3], [0.0, 0.0, 2 * ln3]]])  # softmax = [1, 1, 9] / 11
    tokens = torch.tensor([[2, 0]])
    # log 9/11 and log 1/11
    close(logprobs_from_logits(logits, tokens), [[-0.2006706954621511, -2.3978952727983707]])
    # temperature 2: logits [0, 0, ln 3] -> [1, 1, 3] / 5: log 3/5 and log 1/5
    close(logprobs_from_logits(logits, tokens, 2.0), [[-0.5108256237659907, -1.6094379124341003]])
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens, temperature=0.0)


def test_logprobs_from_logits_gradient_and_chunks(monkeypatch):
    torch.manual_seed(0)
    full = torch.randn(3, 6, 5, dtype=F64)
    tokens = torch.randint(0, 5, (3, 5))
    logits = full[:, :-1].detach().requires_grad_()  # a non-contiguous slice, as in real use
    assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, tokens, 0.7), (logits,))
    reference = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    for budget in (1 << 24, 10, 5):  # one block; two positions per block; one position per block
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", budget)
        torch.testing.assert_close(logprobs_from_logits(logits, tokens, 0.7), reference)
        assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, tokens, 0.7), (logits,))
    out = logprobs_from_logits(full.to(torch.bfloat16), torch.randint(0, 5, (3, 6)))
    assert out.dtype == torch.float32


def test_entropy_from_logits():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), float("-inf"), float("-inf")]]])
    # uniform over 4: log 4; probs [1/4, 3/4]: -(0.25 ln 0.25 + 0.75 ln 0.75)
    close(entropy_from_logits(logits), [[2 * LOG2, 0.5623351446188083]])
