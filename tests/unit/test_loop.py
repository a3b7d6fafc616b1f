"""The shared loop's pieces: accumulation normalisation, non-finite guard, checkpoint pruning, schedule."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkit.config.schema import LoggerConfig, OptimConfig, SchedConfig, TrainConfig
from llmkit.data.lm import ListDataset, TokenWindows, data_fingerprint
from llmkit.errors import SettingsError, UserError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer, flops_per_token
from llmkit.train import checkpoint as ckpt
from llmkit.train.loop import Trainer, TrainingError, TrainSpec, accumulate, batch_indices, batch_work
from llmkit.train.metrics import measured_peak_flops
from llmkit.train.objectives import IGNORE, CausalLM, unwrap
from llmkit.train.optim import lr_factor
from llmkit.train.runtime import setup_runtime

TINY = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16)


def padded_batch(rows: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, row in enumerate(rows):
        ids[i, : len(row) - 1] = torch.tensor(row[:-1])
        labels[i, : len(row) - 1] = torch.tensor(row[1:])
    return {"input_ids": ids, "labels": labels}


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_mfu_counts_each_batch_at_its_own_width():
    """Short padded batches (SFT, pairs) get the attention FLOPs of their width, not of the longest allowed."""
    cfg = ModelConfig(vocab_size=64, block_size=256, n_layer=2, n_head=2, d_model=32)
    short = {"input_ids": torch.zeros(4, 35, dtype=torch.long), "attention_mask": torch.ones(4, 35)}
    full = {"input_ids": torch.zeros(2, 256, dtype=torch.long)}
    tokens, flops = batch_work([short, full], lambda width: flops_per_token(cfg, width))
    assert tokens == 4 * 35 + 2 * 256
    assert flops == 4 * 35 * flops_per_token(cfg, 35) + 2 * 256 * flops_per_token(cfg, 256)
    assert flops < tokens * flops_per_token(cfg, 256)
    assert batch_work([short], None) == (140, 0.0)



def test_the_mfu_peak_is_measured_and_cached_per_matmul_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    fp32 = measured_peak_flops(torch.device("cpu"))
    bf16 = measured_peak_flops(torch.device("cpu"), torch.bfloat16)
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    name = f"cpu-{torch.get_num_threads()}threads"
    assert cached == {name: fp32, f"{name}-bfloat16": bf16} and fp32 > 0 and bf16 > 0

def test_accumulation_matches_one_big_batch_and_mean_of_means_does_not():
    torch.manual_seed(0)
    rows = [list(range(1, 14)), [5, 6, 7, 8], list(range(20, 30)), [3, 4, 5]]
    model = Transformer(TINY)
    runtime = setup_runtime("cpu")
    objective = CausalLM()
    # One batch holding all four sequences.
    whole = padded_batch(rows, 15)
    total = objective.count(whole)
    loss_one, _ = accumulate(model, objective, [whole], runtime, total)
    g_one = grads(model).clone()
    model.zero_grad()
    # Two micro-batches of unequal padded lengths and unequal target counts.
    micro = [padded_batch(rows[:2], 13), padded_batch(rows[2:], 10)]
    loss_acc, _ = accumulate(model, objective, micro, runtime, sum(objective.count(b) for b in micro))
    g_acc = grads(model).clone()
    assert torch.allclose(loss_one / total, loss_acc / total, atol=1e-6)
    assert torch.allclose(g_one, g_acc, atol=1e-6)
    # The common mistake: average each micro-batch's mean loss.
    model.zero_grad()
    for batch in micro:
        loss_sum, _ = objective(model, batch)
        (loss_sum / objective.count(batch) / len(micro)).backward()
    assert not torch.allclose(g_one, grads(model), atol=1e-4)


class Windows(TokenWindows):
    def __init__(self, n=4000, seed=0, sha256=None):
        rng = np.random.default_rng(seed)
        super().__init__(rng.integers(0, 64, n), 16, seed=seed, sha256=sha256)


class PoisonAt(CausalLM):
    """A loss that turns NaN at given (1-based) steps."""

    def __init__(self, steps, fused=False):
        super().__init__(fused=fused)
        self.steps, self.calls = set(steps), 0

    def __call__(self, model, batch):
        loss, metrics = super().__call__(model, batch)
        training = unwrap(model).training  # (a DeepSpeed engine's own flag stays True in evaluation)
        if training:
            self.calls += 1
        return (loss * math.nan if training and (self.calls + 1) // 2 in self.steps else loss), metrics


def make_trainer(tmp_path: Path, objective, data_sha256: str | None = None, **train):
    cfg = TrainConfig(**{"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "eval_every": 3, "save_every": 3,
                         "log_every": 1, **train})
    torch.manual_seed(0)
    spec = TrainSpec(command="test", model=Transformer(TINY), objective=objective, train_set=Windows(sha256=data_sha256),
                     val_set=Windows(800, 1, sha256="val"), run_dir=tmp_path, meta={"model": {}})
    return Trainer(spec, cfg, OptimConfig(lr=1e-2), SchedConfig(warmup_steps=0), LoggerConfig(tensorboard=False,
                   progress=False), setup_runtime("cpu"))


def test_a_batch_that_does_not_split_over_the_processes_is_a_settings_error():
    """Every process finds it alike, so the CLI prints it once (test_cli)."""
    two_processes = SimpleNamespace(world_size=2)
    cfg = TrainConfig(batch_size=6, micro_batch_size=2)
    with pytest.raises(SettingsError, match=r"train.batch_size=6 must split evenly into processes \(2\)"):
        Trainer(None, cfg, OptimConfig(), SchedConfig(), LoggerConfig(), two_processes)

def test_the_validation_set_does_not_depend_on_the_micro_batch_size(tmp_path):
    """eval_batches counts batches of train.batch_size: halving micro_batch_size to fit memory leaves val_loss as it
    was (it counted micro-batches, so the validation set shrank with it)."""
    losses = [make_trainer(tmp_path / str(micro), CausalLM(), micro_batch_size=micro, eval_batches=3).evaluate()
              for micro in (4, 2, 1)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and losses[2] == pytest.approx(losses[0], abs=1e-6)
    assert make_trainer(tmp_path / "more", CausalLM(), eval_batches=6).evaluate() != pytest.approx(losses[0], abs=1e-4)


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """Step s updates with lr_factor(s - 1) (0-based); the log showed the next step's rate (twice step 1's here)."""
    seen = []
    trainer = make_trainer(tmp_path, CausalLM())
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    trainer.run()
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(seen, rel=1e-3) and len(seen) == 6  # the log keeps 4 significant digits
    assert logged == pytest.approx([1e-2 * lr_factor(s - 1, 6, SchedConfig(warmup_steps=0)) for s in range(1, 7)], rel=1e-3)


def test_nonfinite_loss_stops_with_parameters_untouched(tmp_path):
    trainer = make_trainer(tmp_path, PoisonAt({5}))
    before = {}

    original_step = trainer._step

    def spy():
        if trainer.state.step == 4:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return original_step()

    trainer._step = spy
    with pytest.raises(TrainingError, match=r"step 5: non-finite loss.*step_000003.*set train.on_nonfinite=skip"):
        trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_skip_mode_skips_up_to_the_limit(tmp_path):
    trainer = make_trainer(tmp_path / "a", PoisonAt({2, 4}), on_nonfinite="skip", max_nonfinite_skips=2)
    result = trainer.run()
    assert result.step == 6 and trainer.state.nonfinite_skips == 2
    trainer = make_trainer(tmp_path / "b", PoisonAt({2, 3, 4}), on_nonfinite="skip", max_nonfinite_skips=2)
    with pytest.raises(TrainingError, match=r"step 4.*raise train.max_nonfinite_skips \(all 2 were used\)"):
        trainer.run()


def test_same_seed_same_loss_curve(tmp_path):
    curves = []
    for name in ("a", "b"):
        make_trainer(tmp_path / name, CausalLM()).run()
        curves.append((tmp_path / name / "metrics.jsonl").read_text().splitlines())
    strip = [[line.split('"tokens_per_s"')[0] for line in curve] for curve in curves]
    assert strip[0] == strip[1]


def test_batches_cover_each_epoch_without_overlap():
    data = Windows(16 * 40 + 1)  # 40 windows in epoch 0
    seen = [i for step in range(10) for i in batch_indices(data, 4, 7, step)[1]]
    assert sorted(seen) == list(range(40))
    epoch, _ = batch_indices(data, 4, 7, 10)
    assert epoch == 1
    with pytest.raises(UserError, match=r"gives 40 rows .* fewer than one batch \(train.batch_size=64\).*data.packing"):
        batch_indices(data, 64, 7, 0)


def test_pruning_keeps_last_k_and_best_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    vals = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.8, 5: 2.9}
    for step, val in vals.items():
        tmp = ckpt.begin_checkpoint(root, step)
        ckpt.finish_checkpoint(root, tmp, step, {"w": torch.ones(2)}, {}, {"val_loss": val}, {})
        best = min(ckpt.complete_checkpoints(root), key=lambda p: ckpt.read_meta(p)["val_loss"])
        ckpt.prune_checkpoints(root, keep_last=2, best=best)
    names = [p.name for p in ckpt.complete_checkpoints(root)]
    assert names == ["step_000002", "step_000004", "step_000005"]
    assert ckpt.latest_checkpoint(root).name == "step_000005"


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    tmp = ckpt.begin_checkpoint(root, 1)
    ckpt.finish_checkpoint(root, tmp, 1, {"w": torch.ones(2)}, {}, {}, {})
    (root / "step_000002").mkdir()  # a crash left a half-written directory
    (root / "step_000002" / "model.safetensors").write_bytes(b"garbage")
    (root / "latest").write_text("step_000002\n")
    assert ckpt.latest_checkpoint(root).name == "step_000001"


def test_warmup_then_cosine_to_floor():
    cfg = SchedConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(1 / 11)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, 100, cfg) < 1.0


def test_a_repeated_signal_within_a_second_is_one_request_and_a_later_ctrl_c_exits_at_once(monkeypatch):
    """A terminal's Ctrl-C reaches every process of a launch and launchers pass theirs on too: the duplicate
    must not skip the checkpoint. A Ctrl-C later than that is the user's second one: exit now."""
    import os
    import signal

    from llmkit.train.signals import GracefulStop

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same request, passed on
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 130 and exits == []
        stop.received_at -= GracefulStop.SAME_REQUEST_S + 0.1  # a second later
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(("signame", "hint"), [("SIGTERM", True), ("SIGHUP", False)])
def test_the_stop_message_offers_ctrl_c_only_where_a_terminal_may_be_left(signame, hint, capfd):
    import os
    import signal

    from llmkit.train.signals import GracefulStop

    with GracefulStop():
        os.kill(os.getpid(), getattr(signal, signame))
    said = capfd.readouterr().err
    assert f"{signame} received: finishing this step and saving a checkpoint" in said
    assert ("Ctrl-C again" in said) == hint


def test_a_resume_on_other_data_is_refused_and_one_without_checksums_is_not_checked(tmp_path):
    make_trainer(tmp_path, CausalLM(), data_sha256="abc", max_steps=3).run()
    assert ckpt.read_meta(tmp_path / "checkpoints" / "step_000003")["data_sha256"] is not None
    with pytest.raises(SettingsError, match="step_000003: the training or validation data differ"):
        make_trainer(tmp_path, CausalLM(), data_sha256="abd", resume="auto")
    assert make_trainer(tmp_path, CausalLM(), data_sha256="abc", resume="auto").state.step == 3
    assert make_trainer(tmp_path, CausalLM(), data_sha256=None, resume="auto").state.step == 3  # old shards: unknown


def test_a_list_of_examples_is_fingerprinted_by_every_token():
    examples = [([1, 2, 3], [2, 3, -100]), ([4, 5], [5, -100])]
    same = ListDataset([tuple(list(part) for part in e) for e in examples], list).fingerprint()
    assert ListDataset(examples, list).fingerprint() == same
    assert ListDataset([examples[0], ([4, 6], [6, -100])], list).fingerprint() != same
    assert ListDataset(examples[::-1], list).fingerprint() != same
    assert data_fingerprint(ListDataset(examples, list), None) != data_fingerprint(None, ListDataset(examples, list))
    assert data_fingerprint(ListDataset(examples, list), Windows()) is None  # shards without checksums: unknown


def test_the_data_check_refuses_only_a_known_other_fingerprint(tmp_path):
    """ckpt.refuse_other_data, shared by the supervised loop and PPO."""
    (tmp_path / "meta.json").write_text(json.dumps({"data_sha256": "abc"}))
    ckpt.refuse_other_data(tmp_path, "abc")
    ckpt.refuse_other_data(tmp_path, None)  # data whose checksum is unknown
    with pytest.raises(SettingsError, match=r"data differ.*in a new run \(a new out_dir=, without train.resume\)"):
        ckpt.refuse_other_data(tmp_path, "abd")
    (tmp_path / "meta.json").write_text(json.dumps({"data_sha256": "abc", "command": "sft"}))
    with pytest.raises(SettingsError, match=f"a new run from these weights \\(init_from={tmp_path} out_dir="):
        ckpt.refuse_other_data(tmp_path, "abd")
    (tmp_path / "meta.json").write_text(json.dumps({}))  # a checkpoint from before the check
    ckpt.refuse_other_data(tmp_path, "abd")


def test_progress_stats_fit_a_narrow_terminal_keeping_the_loss():
    """On an 80-column terminal the live line dropped its step count and ETA into ellipses; now the stats shrink."""
    from llmkit.train.progress import fit_stats, format_stats

    stats = {"loss": 4.2815, "lr": 1.05e-3, "tokens_per_s": 37400.0, "mfu": 0.187, "val_loss": 3.88}
    assert fit_stats(stats, 200) == format_stats(stats)
    assert fit_stats(stats, 50) == "loss 4.2815 | 37.4k tok/s | val_loss 3.8800"
    assert fit_stats(stats, 12) == "loss 4.2815"


def test_resuming_drops_later_records_and_says_when_it_drops_foreign_lines(tmp_path, capsys):
    from llmkit.train.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    MetricsLogger(tmp_path, True, False, resume_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert capsys.readouterr().err == ""  # a torn last line is what a kill leaves: nothing to say
    path.write_text('{"step": 1, "loss": 2.0}\nsomeone else\'s text\n{"step": 2, "loss": 1.5}\n')
    MetricsLogger(tmp_path, True, False, resume_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert "had 1 line(s) that are not metrics records" in capsys.readouterr().err
