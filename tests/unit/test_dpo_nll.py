"""DPO + NLL on the chosen response (RPO, Pang et al. 2024): values worked out by hand, the weight-0 identity,
response tokens only, and the same gradient however the loop splits a batch into micro-batches."""

import math

import pytest
import torch

from llmkit.config.schema_align import DPOLossConfig
from llmkit.errors import UserError
from llmkit.rl.losses import dpo_loss, response_nll
from llmkit.rl.rewards import SUMS, DPOObjective, held_out_stats
from llmkit.train.loop import accumulate

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, t(expected, actual.dtype), atol=tol, rtol=0)


def test_response_nll_is_a_per_row_token_mean_over_the_mask():
    logp = t([[-9.0, -1.0, -2.0, -3.0], [-9.0, -9.0, -0.5, -7.0]])
    mask = t([[0, 1, 1, 1], [0, 0, 1, 0]])  # the -9 / -7 positions (prompt, padding) never count
    close(response_nll(logp, mask), [2.0, 0.5])  # (1 + 2 + 3) / 3 and 0.5 / 1
    close(response_nll(logp, mask.bool()), [2.0, 0.5])
    close(response_nll(logp, torch.zeros_like(mask)), [0.0, 0.0])  # no valid token: 0, not nan
    with pytest.raises(ValueError):
        response_nll(logp, mask[:, :3])


def test_dpo_plus_nll_by_hand():
    # sigmoid DPO from test_rl_math: h = 1, beta 0.1 -> log(1 + e^-0.1) = 0.6443966600735709 per pair
    dpo_pair = 0.6443966600735709
    args = (t([-1.0, -1.0]), t([-2.0, -2.0]), t([-1.5, -1.5]), t([-1.5, -1.5]))
    nll = t([2.0, 0.5]).requires_grad_()
    base, base_stats = dpo_loss(*args, beta=0.1)
    loss, stats = dpo_loss(*args, beta=0.1, chosen_nll=nll, nll_weight=0.5)
    # summed over the 2 pairs: 2 * dpo + 0.5 * (2.0 + 0.5)
    close(loss, 2 * dpo_pair + 1.25)
    close(stats["nll"], 1.25)  # batch mean of the chosen NLL
    for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
        torch.testing.assert_close(stats[key], base_stats[key])  # the DPO statistics do not move
    loss.backward()
    close(nll.grad, [0.5, 0.5])  # d loss / d nll_i = nll_weight
    # IPO too: (h - 5)^2 = 16 per pair, + 1.0 * nll
    close(dpo_loss(*args, beta=0.1, kind="ipo", chosen_nll=t([2.0, 0.5]), nll_weight=1.0)[0], 32.0 + 2.5)


def test_nll_weight_zero_leaves_the_loss_unchanged():
    args = (t([-1.0, -4.0]), t([-2.0, -3.0]), t([-1.5, -3.5]), t([-1.5, -2.0]))
    base, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    zero, stats = dpo_loss(*args, beta=0.1, label_smoothing=0.1, chosen_nll=t([7.0, 3.0]), nll_weight=0.0)
    assert torch.equal(base, zero)
    close(stats["nll"], 5.0)  # logged anyway
    with pytest.raises(ValueError, match="nll_weight"):
        dpo_loss(*args, beta=0.1, nll_weight=-0.1, chosen_nll=t([1.0, 1.0]))
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(*args, beta=0.1, nll_weight=1.0)


class FixedLogits(torch.nn.Module):
    """A model whose logits are a learned table indexed by the input token (a bigram model)."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed),
                                                    dtype=F64))

    def forward(self, ids, attention_mask=None):
        return self.table[ids]  # (B, T, V)


def pair_batch():
    """2 pairs, right-padded: rows 0-1 chosen, rows 2-3 rejected; the prompt is the first 2 tokens."""
    ids = t([[1, 2, 3, 4, 0], [1, 3, 2, 0, 0], [1, 2, 4, 4, 4], [1, 3, 1, 0, 0]], torch.long)
    attention = t([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], torch.long)
    response = attention.clone()
    response[:, :2] = 0
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def by_hand_nll(model, batch, rows):
    """Per-token mean NLL of each row's response tokens, written out token by token."""
    out = []
    for b in rows:
        terms = []
        for pos in range(1, batch["input_ids"].shape[1]):
            if batch["response_mask"][b, pos]:
                logits = model.table[batch["input_ids"][b, pos - 1]]
                terms.append(-torch.log_softmax(logits, -1)[batch["input_ids"][b, pos]])
        out.append(sum(terms) / len(terms))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_objective_adds_the_chosen_response_nll_only(kind):
    policy, reference = FixedLogits(5, seed=0), FixedLogits(5, seed=1)
    batch = pair_batch()
    plain = DPOObjective(reference, kind, 0.1, 0.0)
    rpo = DPOObjective(reference, kind, 0.1, 0.0, nll_weight=0.7)
    base, base_stats, chosen, rejected = plain.compute(policy, batch)
    loss, stats, chosen2, rejected2 = rpo.compute(policy, batch)
    nll = by_hand_nll(policy, batch, rows=[0, 1])  # the chosen rows' response tokens: 2 and 1 of them
    torch.testing.assert_close(loss, base + 0.7 * nll.sum())
    torch.testing.assert_close(stats["nll"], nll.mean())
    torch.testing.assert_close(base_stats["nll"], nll.mean())  # logged at weight 0 too, without changing the loss
    assert torch.equal(chosen, chosen2) and torch.equal(rejected, rejected2)  # implicit rewards untouched
    # the prompt and the rejected rows do not enter the NLL: changing their logits' effect on it is 0
    base.backward()
    grad_plain = policy.table.grad.clone()
    policy.table.grad = None
    rpo.compute(policy, batch)[0].backward()
    policy.table.grad -= grad_plain
    nll_policy = FixedLogits(5, seed=0)
    (0.7 * by_hand_nll(nll_policy, batch, rows=[0, 1]).sum()).backward()
    torch.testing.assert_close(policy.table.grad, nll_policy.table.grad)


class Runtime:
    world_size = 1
    device = torch.device("cpu")

    def no_sync(self, model, skip_sync):
        from contextlib import nullcontext
        return nullcontext()

    def autocast(self):
        from contextlib import nullcontext
        return nullcontext()

    def backward(self, loss):
        loss.backward()


def split(batch, pairs):
    """The micro-batch of the given pairs (chosen rows, then their rejected rows), trimmed to its width."""
    n = batch["input_ids"].shape[0] // 2
    rows = list(pairs) + [n + p for p in pairs]
    width = int(batch["attention_mask"][rows].sum(-1).max())
    return {k: v[rows, :width] for k, v in batch.items()}


def test_same_gradient_under_micro_batching():
    """The loop divides by the pair count: one batch of 2 pairs and 2 micro-batches of 1 give the same step."""
    batch = pair_batch()
    grads, logged = [], []
    for micro in ([batch], [split(batch, [0]), split(batch, [1])]):
        policy = FixedLogits(5, seed=0)
        objective = DPOObjective(FixedLogits(5, seed=1), "sigmoid", 0.1, 0.0, nll_weight=1.0)
        total = sum(objective.count(b) for b in micro)
        loss_sum, metric_sums = accumulate(policy, objective, micro, Runtime(), total)
        grads.append(policy.table.grad)
        logged.append((loss_sum / total, metric_sums["nll"] / total))
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(logged[0], logged[1])
    # and the logged nll is the mean over pairs of each chosen response's token mean
    expected = by_hand_nll(FixedLogits(5, seed=0), batch, [0, 1]).mean().detach().float()
    torch.testing.assert_close(logged[0][1], expected)


def test_held_out_nll_is_the_mean_over_pairs_whatever_the_batches():
    """Evaluation sums each pair's chosen-response NLL; val_nll is their mean over all held-out pairs."""
    batch = pair_batch()
    expected = by_hand_nll(FixedLogits(5, seed=0), batch, [0, 1]).mean().item()
    for micro in ([batch], [split(batch, [0]), split(batch, [1])]):
        policy = FixedLogits(5, seed=0).eval()
        objective = DPOObjective(FixedLogits(5, seed=1), "sigmoid", 0.1, 0.0)
        objective.collected = {key: torch.zeros(()) for key in (*SUMS, *objective.held_out_means)}
        with torch.no_grad():
            for b in micro:
                objective(policy, b)
        stats = held_out_stats({k: v.item() for k, v in objective.collected.items()}, objective.held_out_means)
        assert stats["val_nll"] == pytest.approx(expected, abs=1e-6)
        assert stats["val_accuracy"] in (0.0, 0.5, 1.0)


def test_config_validates_nll_weight():
    assert DPOLossConfig().nll_weight == 0.0
    assert DPOLossConfig(nll_weight=0.5).nll_weight == 0.5
    with pytest.raises(UserError, match=r"loss\.nll_weight must be >= 0"):
        DPOLossConfig(nll_weight=-1.0)
    assert math.isfinite(DPOLossConfig(kind="ipo", nll_weight=2.0).nll_weight)


def test_cli_takes_and_checks_nll_weight(cli):
    done = cli("dpo", "loss.nll_weight=0.5", "--print-config")
    assert done.returncode == 0, done.stderr
    assert "nll_weight: 0.5" in done.stdout
    done = cli("dpo", "loss.nll_weight=-1", "--print-config")
    assert done.returncode == 2 and "loss.nll_weight must be >= 0" in done.stderr, done.stderr
