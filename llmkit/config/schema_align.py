"""Typed schemas of the alignment commands: `llmkit reward`, `llmkit dpo` and `llmkit ppo`.

Like `llmkit.config.schema` (whose shared pieces they reuse): OmegaConf-compatible dataclasses,
range checks in `__post_init__` raising UserError naming the key, and no torch import. The roots
register themselves in `ROOTS` (schema.py imports this module at its end), so importing either
module first works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmkit.config.schema import (
    DEVICES,
    MIN_TEMPERATURE,
    ROOTS,
    LauncherConfig,
    LoggerConfig,
    OptimConfig,
    RunConfig,
    SchedConfig,
    TrainConfig,
    check_resume,
)
from llmkit.data.tinyworld import FAMILIES
from llmkit.errors import UserError
from llmkit.tokenizer.chat import load_template

PREFERENCE_SOURCES = ("tinyworld", "files", "hub")
PREFERENCE_FORMATS = ("auto", "pairs", "hh", "messages")
PROMPT_SOURCES = ("tinyworld", "files")
DPO_LOSSES = ("sigmoid", "ipo")
PPO_BASELINES = ("value", "group")
REWARD_RULES = ("exact_match",)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key}={value!r} is not one of: {', '.join(choices)}")


def _check_tinyworld(cfg, prefix: str) -> None:
    """Counts and families of the tiny-world fields shared by the preference and prompt data configs."""
    for key in ("tinyworld_train", "tinyworld_validation"):
        _check(getattr(cfg, key) > 0, f"{prefix}.{key} must be positive, got {getattr(cfg, key)}")
    if cfg.tinyworld_families is not None:
        unknown = [f for f in cfg.tinyworld_families if f not in FAMILIES]
        _check(not unknown and len(cfg.tinyworld_families) > 0,
               f"{prefix}.tinyworld_families has unknown or no families {unknown}; choose from {', '.join(FAMILIES)}")
    if cfg.chat_template is not None:
        try:
            load_template(cfg.chat_template)
        except UserError as e:
            raise UserError(f"{prefix}.chat_template: {e}") from e
    _check(0.0 < cfg.val_fraction <= 0.5, f"{prefix}.val_fraction must be in (0, 0.5], got {cfg.val_fraction}")
    _choice(f"{prefix}.encoding_errors", cfg.encoding_errors, ("strict", "replace"))


@dataclass
class PreferenceDataConfig:
    """Preference pairs (a prompt, a chosen and a rejected response), in one of three record shapes.

    pairs: separate prompt / chosen / rejected strings. hh: full transcripts as in Anthropic HH-RLHF
    ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the shared prefix up to the last Assistant turn is the
    prompt. messages: chosen / rejected are chat `messages` lists ending with the assistant answer
    (the prompt is the messages before it, or the prompt field). auto tells them apart per record.
    """

    source: str = "tinyworld"  # tinyworld | files | hub
    path: str | None = None  # files: a .jsonl/.json/.csv/.parquet file, directory or glob
    validation_path: str | None = None  # files: held-out pairs; None: hold out val_fraction of path
    format: str = "auto"  # auto | pairs | hh | messages
    prompt_field: str = "prompt"  # files: the prompt (a string or a messages list)
    chosen_field: str = "chosen"  # files: the preferred answer
    rejected_field: str = "rejected"  # files: the other answer
    system_prompt: str | None = None  # a system message for prompts without one
    chat_template: str | None = None  # None: the template the SFT run was tuned with
    max_length: int | None = None  # tokens of prompt + response; longer pairs are dropped; None: the context
    tinyworld_train: int = 2000  # tinyworld: training pairs
    tinyworld_validation: int = 200  # tinyworld: held-out pairs
    tinyworld_seed: int = 0  # tinyworld: which generated pairs
    tinyworld_families: list[str] | None = None  # tinyworld: task families to use (None: all)
    tinyworld_style_fraction: float = 0.0  # share of pairs preferring the bare answer to a chatty one
    hub_name: str | None = None  # hub: dataset name
    hub_config: str | None = None  # hub: dataset configuration
    hub_split: str = "train"  # hub: the split to read
    hub_validation_split: str | None = None  # None: hold out val_fraction of hub_split
    val_fraction: float = 0.05  # pairs held out (by content hash) when there is no validation file/split
    encoding_errors: str = "strict"  # strict | replace

    def __post_init__(self) -> None:
        _choice("data.source", self.source, PREFERENCE_SOURCES)
        _choice("data.format", self.format, PREFERENCE_FORMATS)
        _check(self.source != "files" or bool(self.path),
               "data.source=files needs data.path=<a .jsonl/.json/.csv/.parquet file, directory or glob>")
        _check(self.source != "hub" or bool(self.hub_name), "data.source=hub needs data.hub_name=<dataset name>")
        for key in ("prompt_field", "chosen_field", "rejected_field"):
            _check(bool(getattr(self, key)), f"data.{key} must name a field, got an empty string")
        _check(self.max_length is None or self.max_length >= 4,
               f"data.max_length must be at least 4 tokens (or null for the model's context), got {self.max_length}")
        _check_tinyworld(self, "data")
        _check(0.0 <= self.tinyworld_style_fraction < 1.0,
               f"data.tinyworld_style_fraction must be in [0, 1), got {self.tinyworld_style_fraction}")


@dataclass
class PromptDataConfig:
    """Prompts for PPO rollouts: the tiny world (answers known) or records with a prompt (and answer) field."""

    source: str = "tinyworld"  # tinyworld | files
    path: str | None = None  # files: records with prompt_field (and answer_field for rule rewards)
    validation_path: str | None = None  # files: held-out prompts; None: hold out val_fraction of path
    prompt_field: str = "prompt"  # files: the prompt (a string or a messages list)
    answer_field: str = "answer"  # needed by rule rewards (reward.rule=exact_match)
    system_prompt: str | None = None  # a system turn put before every prompt (None: none)
    chat_template: str | None = None  # None: the template the SFT run was tuned with
    tinyworld_train: int = 2000  # tinyworld: training prompts
    tinyworld_validation: int = 64  # held-out prompts scored (greedy) at every evaluation
    tinyworld_seed: int = 0  # tinyworld: which generated prompts
    tinyworld_families: list[str] | None = None  # tinyworld: task families to use (None: all)
    val_fraction: float = 0.05  # prompts held out (by content hash) when there is no validation file
    encoding_errors: str = "strict"  # strict | replace: invalid UTF-8 in the files

    def __post_init__(self) -> None:
        _choice("data.source", self.source, PROMPT_SOURCES)
        _check(self.source != "files" or bool(self.path),
               "data.source=files needs data.path=<a .jsonl/.json/.csv/.parquet file, directory or glob>")
        _check(bool(self.prompt_field), "data.prompt_field must name a field, got an empty string")
        _check_tinyworld(self, "data")


@dataclass
class RewardLossConfig:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin) + centering * (r_chosen + r_rejected)^2."""

    margin: float = 0.0  # required reward gap between chosen and rejected (0: plain Bradley-Terry)
    centering: float = 0.0  # weight of the term keeping rewards centred on 0 (e.g. 0.01)

    def __post_init__(self) -> None:
        _check(self.margin >= 0, f"loss.margin must be >= 0, got {self.margin}")
        _check(self.centering >= 0, f"loss.centering must be >= 0, got {self.centering}")


@dataclass
class DPOLossConfig:
    """DPO (sigmoid, summed log-probs) or IPO (squared, per-token averaged log-probs) against a frozen reference."""

    kind: str = "sigmoid"  # sigmoid | ipo
    beta: float = 0.1  # strength of the implicit KL to the reference
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only): assumed share of flipped labels
    nll_weight: float = 0.0  # RPO: + nll_weight * per-token mean NLL of the chosen response (keeps it likely)

    def __post_init__(self) -> None:
        _choice("loss.kind", self.kind, DPO_LOSSES)
        _check(self.beta > 0, f"loss.beta must be positive, got {self.beta}")
        _check(0.0 <= self.label_smoothing <= 0.5, f"loss.label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        _check(self.kind == "sigmoid" or self.label_smoothing == 0, "loss.label_smoothing applies only to loss.kind=sigmoid")
        _check(self.nll_weight >= 0, f"loss.nll_weight must be >= 0 (0 turns the chosen-response NLL term off), "
                                     f"got {self.nll_weight}")


@dataclass
class RewardSourceConfig:
    """What scores a PPO response: a trained reward model (`model`) if set, else a rule."""

    model: str | None = None  # a `llmkit reward` run or checkpoint; wins over rule
    rule: str = "exact_match"  # exact_match: 1 if the response equals the known answer, else 0
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ends (hits max tokens)
    whiten: bool = False  # normalise scores over each rollout batch to mean 0, std 1
    clip: float | None = None  # clip scores to [-clip, clip] (after whitening)

    def __post_init__(self) -> None:
        _choice("reward.rule", self.rule, REWARD_RULES)
        _check(self.missing_eos_penalty >= 0, f"reward.missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        _check(self.clip is None or self.clip > 0, f"reward.clip must be positive or null, got {self.clip}")


@dataclass
class RolloutConfig:
    """Sampling of responses: the same temperature scales the training log-probs."""

    batch_size: int = 32  # responses per iteration
    samples_per_prompt: int = 1  # responses drawn per prompt (batch_size / samples_per_prompt prompts each iteration)
    max_new_tokens: int = 16  # a response that reaches this without eos is truncated and penalised
    temperature: float = 1.0  # sampling temperature; the log-probs are taken at it too

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, f"rollout.batch_size must be positive, got {self.batch_size}")
        _check(self.samples_per_prompt > 0 and self.batch_size % self.samples_per_prompt == 0,
               f"rollout.samples_per_prompt={self.samples_per_prompt} must be positive and divide "
               f"rollout.batch_size={self.batch_size}")
        _check(self.max_new_tokens > 0, f"rollout.max_new_tokens must be positive, got {self.max_new_tokens}")
        _check(self.temperature >= MIN_TEMPERATURE, f"rollout.temperature must be at least {MIN_TEMPERATURE} (PPO needs "
               f"sampling, and smaller ones overflow), got {self.temperature}")


@dataclass
class PPOLossConfig:
    """K epochs of clipped policy / value updates over minibatches of each rollout."""

    epochs: int = 4  # passes over each rollout
    minibatch_size: int = 16  # responses per optimizer step
    micro_batch_size: int = 8  # responses per forward pass (the rest is gradient accumulation)
    clip_eps: float = 0.2  # policy ratio clipped to [1 - eps, 1 + eps]
    value_clip_eps: float = 0.2  # value updates clipped to +-eps around the rollout's values
    entropy_coef: float = 0.0  # bonus for entropy (0: none)
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages per rollout (mean 0, std 1)
    value_warmup: int = 0  # first iterations that train only the value model (the policy is left as it is)
    baseline: str = "value"  # value: GAE on the value model | group: leave-one-out mean of the prompt's other responses

    def __post_init__(self) -> None:
        _check(self.value_warmup >= 0, f"ppo.value_warmup must be >= 0, got {self.value_warmup}")
        _choice("ppo.baseline", self.baseline, PPO_BASELINES)
        for key in ("epochs", "minibatch_size", "micro_batch_size"):
            _check(getattr(self, key) > 0, f"ppo.{key} must be positive, got {getattr(self, key)}")
        _check(self.minibatch_size % self.micro_batch_size == 0,
               f"ppo.minibatch_size={self.minibatch_size} must be a multiple of ppo.micro_batch_size={self.micro_batch_size}")
        for key in ("clip_eps", "value_clip_eps"):
            _check(getattr(self, key) > 0, f"ppo.{key} must be positive, got {getattr(self, key)}")
        _check(self.entropy_coef >= 0, f"ppo.entropy_coef must be >= 0, got {self.entropy_coef}")
        for key in ("gamma", "lam"):
            _check(0 <= getattr(self, key) <= 1, f"ppo.{key} must be in [0, 1], got {getattr(self, key)}")


@dataclass
class KLConfig:
    """Per-token penalty beta * (log pi - log pi_ref) in the reward; beta fixed or adapted to a target KL."""

    coef: float = 0.05  # beta (the initial one when adaptive)
    adaptive: bool = False  # adapt beta toward kl.target (Ziegler et al.)
    target: float = 6.0  # adaptive: wanted KL per response (nats)
    horizon: float = 10000.0  # adaptive: responses over which beta moves by at most 20%

    def __post_init__(self) -> None:
        _check(self.coef >= 0, f"kl.coef must be >= 0, got {self.coef}")
        _check(self.target > 0, f"kl.target must be positive, got {self.target}")
        _check(self.horizon > 0, f"kl.horizon must be positive, got {self.horizon}")


@dataclass
class PPOTrainConfig:
    """The PPO loop's bookkeeping: iterations, evaluation, checkpoints, resume, guards."""

    max_steps: int = 40  # PPO iterations (rollout + update)
    seed: int = 1337  # value head init, prompt order, sampling: one seed, one run
    eval_every: int = 10  # greedy mean reward on the held-out prompts
    save_every: int = 10  # iterations between checkpoints
    keep_last: int = 2  # checkpoints kept
    resume: str = "never"  # never | auto | a checkpoint directory
    overwrite: bool = False  # allow reusing an out_dir that holds another run (clears it)
    log_every: int = 1  # iterations between metrics lines
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or grad norm does
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: skipped updates allowed before the run stops
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        for key in ("max_steps", "eval_every", "save_every", "log_every"):
            _check(getattr(self, key) > 0, f"train.{key} must be positive, got {getattr(self, key)}")
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _check(self.max_nonfinite_skips >= 0, f"train.max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        _choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("train.device", self.device, DEVICES)
        check_resume(self.resume)


@dataclass
class RewardConfig(RunConfig):
    """`llmkit reward`: a scalar head on an SFT trunk, trained on preference pairs (Bradley-Terry)."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    init_from: str = "runs/sft/latest"  # the SFT run or checkpoint the reward model starts from
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class DPOConfig(RunConfig):
    """`llmkit dpo`: align an SFT policy directly on preference pairs against a frozen copy of itself."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # the SFT run or checkpoint: the policy's start and the frozen reference
    init_from: str = "runs/sft/latest"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class PPOConfig(RunConfig):
    """`llmkit ppo`: an SFT policy, a frozen reference, a value model and a reward source, trained with PPO."""

    # the SFT run or checkpoint: the policy's start and the frozen reference
    init_from: str = "runs/sft/latest"
    value_from: str | None = None  # a `llmkit reward` run whose trunk starts the value model (InstructGPT); None: the SFT
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # the policy's optimizer
    value_optim: OptimConfig = field(default_factory=OptimConfig)  # the value model's optimizer
    sched: SchedConfig = field(default_factory=SchedConfig)  # both learning rates, stepped once per iteration
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _check(self.rollout.batch_size % self.ppo.minibatch_size == 0,
               f"rollout.batch_size={self.rollout.batch_size} must be a multiple of ppo.minibatch_size="
               f"{self.ppo.minibatch_size}")
        _check(self.ppo.baseline != "group" or self.rollout.samples_per_prompt > 1,
               "ppo.baseline=group compares the responses to the same prompt: set rollout.samples_per_prompt >= 2")
        _check(self.reward.model is not None or self.data.source == "tinyworld" or bool(self.data.answer_field),
               "reward.rule needs data.answer_field (the known answers), or set reward.model=<a reward run>")


ROOTS.update(reward=RewardConfig, dpo=DPOConfig, ppo=PPOConfig)
