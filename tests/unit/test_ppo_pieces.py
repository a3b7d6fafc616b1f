"""PPO pieces on tiny random models: left padding, the first ratio, eos/truncation, reward heads."""

import pytest
import torch

from llmkit.config.schema import LoggerConfig
from llmkit.config.schema_align import (
    PPOConfig,
    PPOLossConfig,
    PPOTrainConfig,
    PromptDataConfig,
    RolloutConfig,
)
from llmkit.data import tinyworld as tw
from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.heads import ScalarModel, last_token_values
from llmkit.model.transformer import Transformer
from llmkit.rl.ppo import PPOModels, PPOTrainer
from llmkit.rl.rewards import ExactMatchReward
from llmkit.rl.rollout import load_prompts, policy_forward, response_text, sample_rollout
from llmkit.tokenizer.bpe import train_bpe
from llmkit.train.runtime import setup_runtime

EOS, PAD = "<|endoftext|>", "<|pad|>"


@pytest.fixture(scope="module")
def tok():
    texts = [f"User: {t.prompt}\nAssistant: {t.answer}\n" for t in tw.make_tasks("train", 300)]
    return train_bpe(texts, vocab_size=400)


def make_model(vocab: int, style: str = "gpt2", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    if style == "gpt2":
        cfg = ModelConfig(vocab_size=vocab, block_size=96, n_layer=2, n_head=2, d_model=32)
    else:
        cfg = ModelConfig(vocab_size=vocab, block_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                          norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False, bias=False)
    return Transformer(cfg).eval()


def prompts_for(tok, n: int, split: str = "train"):
    cfg = PromptDataConfig(tinyworld_train=n, tinyworld_validation=n)
    items, dropped = load_prompts(cfg, split, tok, "chatml", EOS, 80)
    assert dropped == 0 and len(items) == n
    return items


def make_trainer(tok, tmp_path, policy: Transformer, ppo: dict | None = None, **rollout) -> PPOTrainer:
    cfg = PPOConfig(rollout=RolloutConfig(batch_size=8, max_new_tokens=6, **rollout),
                    ppo=PPOLossConfig(epochs=2, minibatch_size=4, micro_batch_size=2, **(ppo or {})),
                    train=PPOTrainConfig(device="cpu", max_steps=2), logger=LoggerConfig(tensorboard=False, progress=False))
    models = PPOModels(policy, make_model(policy.cfg.vocab_size), ScalarModel(make_model(policy.cfg.vocab_size)))
    models.reference.load_state_dict(policy.state_dict())
    return PPOTrainer(cfg, models, ExactMatchReward(), tok, prompts_for(tok, 16), prompts_for(tok, 4, "validation"),
                      setup_runtime("cpu", "fp32"), tmp_path, {"eos_token": EOS, "pad_token": PAD}, {})


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_left_padding_does_not_change_response_logprobs(tok, style):
    model = make_model(tok.get_vocab_size(), style)
    items = prompts_for(tok, 6)
    assert len({len(p.ids) for p in items}) > 1, "prompts of different lengths, so some rows are left-padded"
    rollout = sample_rollout(model, [p.ids for p in items], max_new_tokens=5, temperature=1.0,
                             eos_id=tok.token_to_id(EOS), pad_id=tok.token_to_id(PAD),
                             generator=torch.Generator().manual_seed(0), tokenizer=tok)
    P = rollout.prompt_len
    with torch.no_grad():
        batched, _ = policy_forward(model, rollout.tokens, rollout.attention_mask, P, 0.7)  # (B, N)
        for row, item in enumerate(items):
            start = P - len(item.ids)  # no left padding: the row alone
            alone, _ = policy_forward(model, rollout.tokens[row:row + 1, start:],
                                      rollout.attention_mask[row:row + 1, start:], len(item.ids), 0.7)
            valid = rollout.response_mask[row]
            torch.testing.assert_close(batched[row][valid], alone[0][valid], atol=1e-5, rtol=1e-5)


def test_ratio_is_exactly_one_on_the_first_minibatch_and_kl_zero_at_the_start(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, make_model(tok.get_vocab_size()))
    exp = trainer.experience(0)
    assert exp.stats["kl"] == 0.0  # the policy is its reference
    stats = trainer.update(exp, 0)
    assert len(stats) == 2 * 2  # epochs x minibatches
    assert stats[0]["ratio_dev"] == 0.0 and stats[0]["clipfrac"] == 0.0 and stats[0]["approx_kl"] == 0.0
    assert stats[1]["ratio_dev"] > 0.0  # after one optimizer step the policy has moved


def test_samples_per_prompt_and_the_group_baseline(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, make_model(tok.get_vocab_size()), samples_per_prompt=4,
                           ppo={"baseline": "group", "whiten_advantages": False})
    exp = trainer.experience(0)
    rollout, P = exp.rollout, exp.rollout.prompt_len
    prompts = rollout.tokens[:, :P].view(2, 4, P)
    assert (prompts == prompts[:, :1]).all() and not (prompts[0, 0] == prompts[1, 0]).all()  # 2 prompts x 4
    per_response = exp.advantages[:, 0].view(2, 4)  # the same advantage on every token of a response
    assert torch.equal(exp.advantages, torch.where(rollout.response_mask, exp.advantages[:, :1], 0.0))
    torch.testing.assert_close(per_response.sum(1), torch.zeros(2), atol=1e-5, rtol=0)  # leave-one-out sums to 0
    with pytest.raises(UserError, match="samples_per_prompt"):
        PPOConfig(ppo=PPOLossConfig(baseline="group"))


def test_value_warmup_trains_only_the_value_model(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, make_model(tok.get_vocab_size()), ppo={"value_warmup": 1})
    policy = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    value = {k: v.clone() for k, v in trainer.value.state_dict().items()}
    trainer.update(trainer.experience(0), 0)
    assert all(torch.equal(policy[k], v) for k, v in trainer.policy.state_dict().items())
    assert not all(torch.equal(value[k], v) for k, v in trainer.value.state_dict().items())
    trainer.update(trainer.experience(1), 1)  # warm-up over: the policy moves too
    assert not all(torch.equal(policy[k], v) for k, v in trainer.policy.state_dict().items())


def eos_prone_model(vocab: int, eos: int, p_eos: float) -> Transformer:
    """Every position predicts eos with probability p_eos and every other token uniformly."""
    model = make_model(vocab)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0  # the final hidden state is e_0 everywhere
        model.lm_head = torch.nn.Linear(32, vocab, bias=False)
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = float(torch.tensor(p_eos * (vocab - 1) / (1 - p_eos)).log())
    return model


def test_eos_masks_the_rest_and_truncated_responses_are_penalised(tok, tmp_path):
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    trainer = make_trainer(tok, tmp_path, eos_prone_model(tok.get_vocab_size(), eos, 0.2))
    exp = trainer.experience(0)
    rollout, mask = exp.rollout, exp.rollout.response_mask
    P, N = rollout.prompt_len, mask.shape[1]
    assert N == 6 and rollout.ended.any() and not rollout.ended.all()
    for row in range(mask.shape[0]):
        response = rollout.tokens[row, P:]
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # one run from the first token
        if rollout.ended[row]:
            assert response[length - 1] == eos and (response[length:] == pad).all()
            assert not (response[:length - 1] == eos).any()
        else:
            assert length == N and not (response == eos).any()
        assert (exp.advantages[row, length:] == 0).all() and (exp.returns[row, length:] == 0).all()
    raw, scores = trainer._scores(rollout, ["x"] * mask.shape[0])
    penalty = trainer.cfg.reward.missing_eos_penalty
    torch.testing.assert_close(scores, raw - penalty * (~rollout.ended).float())
    assert penalty > 0


def test_exact_match_reads_the_response_up_to_its_end_of_turn(tok):
    specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ids = tok.encode("432<|im_end|>", add_special_tokens=False).ids
    assert response_text(tok, ids, specials) == "432"
    scores = ExactMatchReward()(None, None, ["432", " 432 ", "43"], ["432", "432", "432"])
    assert scores.tolist() == [1.0, 1.0, 0.0]


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = ScalarModel(make_model(50, "llama")).eval()
    seq = torch.tensor([[5, 9, 13, 7, 21]])
    alone = model(seq, torch.ones_like(seq))[0]  # (T,)
    right = torch.tensor([[5, 9, 13, 7, 21, 0, 0]])
    right_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 0, 5, 9, 13, 7, 21]])
    left_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        for ids, mask in ((right, right_mask), (left, left_mask)):
            torch.testing.assert_close(model.score(ids, mask)[0], alone[-1], atol=1e-5, rtol=1e-5)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    assert last_token_values(values, mask).tolist() == [2.0, 8.0]
