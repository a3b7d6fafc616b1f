"""Typed schemas: one root dataclass per command, built from small shared pieces.

Hydra composes the YAML in `conf/` onto these dataclasses (registered in the ConfigStore),
so a wrong type or an unknown key fails at composition; `__post_init__` checks ranges.
No torch import here: the CLI validates a config before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmkit.data.config import CorpusConfig
from llmkit.data.sft_config import SFTDataConfig
from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.peft.config import MERGEABLE, PeftConfig
from llmkit.tokenizer.config import TokenizerConfig

# Below this a sampling temperature is greedy in all but name, and logits / temperature can overflow fp32 (NaN).
MIN_TEMPERATURE = 1e-4
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when a GPU is visible, else the CPU


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key}={value!r} is not one of: {', '.join(choices)}")


@dataclass
class OptimConfig:
    """AdamW (fused where available) or SGD; weight decay on weight matrices only (never on norms or biases)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.1  # decoupled; matrices only (see decay_embeddings)
    beta1: float = 0.9  # AdamW's first-moment decay (SGD: momentum)
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    decay_embeddings: bool = True  # whether embedding matrices get weight decay
    fused: bool | None = None  # None: fused when the device supports it
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _check(0 <= value < 1, f"optim.{key} must be in [0, 1), got {value}")
        _check(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class SchedConfig:
    """Learning-rate schedule: linear warmup, then cosine/linear decay to min_lr_ratio * lr, or constant."""

    name: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 50  # linear warmup from 0 to optim.lr
    min_lr_ratio: float = 0.1  # cosine/linear end at optim.lr times this

    def __post_init__(self) -> None:
        _choice("sched.name", self.name, ("cosine", "linear", "constant"))
        _check(self.warmup_steps >= 0, f"sched.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"sched.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """The shared supervised loop: batch geometry, evaluation, checkpoints, resume, guards."""

    max_steps: int = 1000  # optimizer steps
    seed: int = 1337  # weights init, data order, dropout: one seed, one run
    batch_size: int = 32  # global batch, in sequences (examples or pairs), across all processes
    micro_batch_size: int = 8  # per process and forward pass; the rest is gradient accumulation
    seq_len: int | None = None  # None: the model's context (model.block_size)
    eval_every: int = 100  # steps between validation losses
    eval_batches: int = 5  # validation batches of train.batch_size examples per evaluation (the same each time)
    save_every: int = 200  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept besides the best one
    resume: str = "never"  # never | auto | a checkpoint directory
    overwrite: bool = False  # allow reusing an out_dir that holds another run (clears it)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    log_every: int = 10  # steps between metrics lines (loss read from the device only then)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or grad norm does
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: skipped updates allowed before the run stops
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16
    # Any, not str: YAML and CLI booleans stay booleans in the printed config; a str after __post_init__.
    compile: Any = "auto"  # true | false | auto (on with CUDA; off on CPU, where it measured not worth the compile)
    fused_loss: bool = True  # lm_head + cross-entropy by row chunks, never the full (B, T, V) logits
    prefetch: bool = True  # build the next step's batches on a background thread during the step
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "micro_batch_size", "eval_every", "eval_batches", "save_every", "log_every"):
            value = getattr(self, key)
            _check(value > 0, f"train.{key} must be positive, got {value}")
        _check(self.batch_size % self.micro_batch_size == 0,
               f"train.batch_size={self.batch_size} must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        _check(self.seq_len is None or self.seq_len > 0, f"train.seq_len must be positive, got {self.seq_len}")
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _check(self.early_stopping_patience is None or self.early_stopping_patience > 0,
               f"train.early_stopping_patience must be positive or null, got {self.early_stopping_patience}")
        _check(self.max_nonfinite_skips >= 0, f"train.max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        _choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("train.device", self.device, DEVICES)
        self.compile = str(self.compile).lower()  # True / False -> 'true' / 'false'
        _choice("train.compile", self.compile, ("auto", "true", "false"))
        check_resume(self.resume)


def check_resume(resume: str) -> None:
    """UserError for a train.resume that is neither never, auto nor a path: empty, or a yes/no (resume=true)."""
    _check(resume.strip().lower() not in ("", "true", "false", "yes", "no", "on", "off", "1", "0"),
           f"train.resume must be never, auto, or a checkpoint directory, got {resume!r} "
           "(auto continues the run in out_dir, never starts a new one)")


@dataclass
class LoggerConfig:
    """Where progress and metrics go (metrics.jsonl is always written)."""

    tensorboard: bool = True  # TensorBoard events when the `tensorboard` extra is installed
    progress: bool = True  # rich progress bar on a terminal


@dataclass
class LauncherConfig:
    """Several processes on this machine: llmkit starts them itself (`llmkit.launcher`), as torchrun would.

    For several GPUs or nodes you may also use `accelerate launch -m llmkit ...` or `torchrun -m llmkit ...`.
    """

    num_processes: int = 1  # processes on this machine (llmkit starts them; gloo on CPU, NCCL on GPU)

    def __post_init__(self) -> None:
        _check(self.num_processes >= 1, f"launcher.num_processes must be >= 1, got {self.num_processes}")


@dataclass
class RunConfig:
    """Fields every command shares: where the run lives."""

    out_dir: str | None = None  # None: runs/<command>/<name or timestamp>
    name: str | None = None  # the run directory's name under runs/<command>/ (None: a timestamp)


@dataclass
class TokenizeConfig(RunConfig):
    """`llmkit tokenize`: train a byte-level BPE tokenizer and encode a corpus into token shards."""

    data: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class PretrainConfig(RunConfig):
    """`llmkit pretrain`: causal language modelling on a corpus (tokenised on the fly if needed)."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tokens_dir: str | None = None  # output of `llmkit tokenize`; None: tokenise data with tokenizer (cached)
    init_from: str | None = None  # start from the weights of a run or checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SFTConfig(RunConfig):
    """`llmkit sft`: supervised fine-tuning on instruction data, loss on assistant tokens by default."""

    init_from: str = "runs/pretrain/latest"  # the pretrained run or checkpoint to start from
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class PeftRunConfig(SFTConfig):
    """`llmkit peft`: train a small set of new or selected parameters; the base stays frozen."""

    peft: PeftConfig = field(default_factory=PeftConfig)
    objective: str = "sft"  # sft: instruction data in data.* | lm: plain text in corpus.* (domain adaptation)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # objective=lm: the text to adapt to
    merge: bool = False  # also write a merged plain checkpoint (lora, dora, qlora, ia3, bitfit)

    def __post_init__(self) -> None:
        _choice("objective", self.objective, ("sft", "lm"))
        _check(not self.merge or self.peft.method in MERGEABLE,
               f"merge=true: peft={self.peft.method} cannot be merged into plain weights (only {', '.join(MERGEABLE)}); "
               "drop merge=true: generate and evaluate load the base with its adapter")
        _check(not (self.merge and self.peft.method == "bitfit" and "lm_head" in self.peft.targets),
               "merge=true: BitFit on lm_head trains an output bias that a plain model has no place for; drop "
               "lm_head from peft.targets, or drop merge=true (generate and evaluate load the base with its adapter)")


@dataclass
class SamplingConfig:
    """How tokens are drawn: greedy at temperature 0."""

    max_new_tokens: int = 64  # tokens to generate per prompt (at most)
    temperature: float = 0.8  # 0: greedy; higher: more random
    top_k: int | None = None  # sample among the k most likely tokens (None: all)
    top_p: float | None = None  # nucleus: the smallest set holding this probability (None: off)
    seed: int = 0  # same seed, same samples
    stop: list[str] = field(default_factory=list)  # stop strings (the end-of-sequence token always stops)

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, f"sampling.max_new_tokens must be positive, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"sampling.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        _check(not 0 < self.temperature < MIN_TEMPERATURE, f"sampling.temperature={self.temperature} is below "
               f"{MIN_TEMPERATURE}, where logits / temperature overflow; use 0 (greedy, what it amounts to)")
        _check(self.top_k is None or self.top_k >= 1, f"sampling.top_k must be >= 1 or null, got {self.top_k}")
        _check(self.top_p is None or 0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _check(all(self.stop), f"sampling.stop holds an empty string, which would stop every answer at once: "
                               f"{list(self.stop)!r}; remove it")


@dataclass
class GenerateConfig:
    """`llmkit generate`: sample continuations of prompts from a run or checkpoint."""

    run: str = "runs/pretrain/latest"  # a run directory, a checkpoint directory, or runs/<command>/latest
    prompt: str | None = None  # one prompt: prompt='Once upon a time'; with no prompt given: 'Return the'
    prompts: list[str] = field(default_factory=list)  # several: 'prompts=[first prompt,second prompt]'
    prompts_file: str | None = None  # a text file with one prompt per line
    chat: bool | None = None  # wrap each prompt as a user turn; None: when the run was fine-tuned on chats
    chat_template: str | None = None  # None: the template the run was fine-tuned with
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stream: bool = True  # print tokens as they come (single prompt)
    compile: bool = False  # torch.compile the one-token decode step: ~15 s to compile on CPU, then 1.2-1.4x at batch 1
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        given = [key for key, value in (("prompt", self.prompt), ("prompts", self.prompts),
                                        ("prompts_file", self.prompts_file)) if value not in (None, [])]
        _check(len(given) <= 1, f"{' and '.join(given)} are set together; give one of prompt=, 'prompts=[...]' "
                                f"or prompts_file= (the others would be ignored)")


@dataclass
class EvaluateConfig:
    """`llmkit evaluate`: held-out perplexity and task suites for runs or checkpoints, side by side."""

    # runs, checkpoints, PEFT runs or adapters, side by side
    runs: list[str] = field(default_factory=lambda: ["runs/pretrain/latest"])
    perplexity: bool = True  # held-out loss, perplexity and bits per byte
    # run: each run's validation split | data: the documents data.* holds out (data.val_fraction, as tokenize
    # splits them) | corpus: every document of data.* (a corpus the runs never trained on)
    heldout: str = "run"
    data: CorpusConfig = field(default_factory=CorpusConfig)
    tasks: list[str] = field(default_factory=list)  # task names (conf/eval_tasks) or YAML paths, e.g. [tinyworld_gen]
    num_fewshot: int | None = None  # override every task's k-shot count (examples from a separate split)
    limit: int | None = None  # score at most this many examples per task
    seq_len: int | None = None  # None: the model's context
    batch_size: int = 8  # sequences (or task examples) per forward pass
    max_batches: int | None = None  # perplexity: None scores the whole split
    output: str | None = None  # one JSON file for all results; None: each run's own <run>/eval.json
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        _choice("heldout", self.heldout, ("run", "data", "corpus"))
        _check(self.heldout != "run" or self.data == CorpusConfig(),
               "data.* is read with heldout=data (the documents it holds out) or heldout=corpus (all of them); "
               "heldout=run scores each run's own validation split: add heldout=corpus or heldout=data")
        _check(len(self.runs) > 0, "runs must name at least one run or checkpoint")
        twice = next((run for run in self.runs if self.runs.count(run) > 1), None)
        _check(twice is None, f"runs names {twice} twice; the table has one column per run: name each run once")
        _check(self.seq_len is None or self.seq_len > 0, f"seq_len must be positive or null (the model's context), "
               f"got {self.seq_len}")
        _check(self.perplexity or len(self.tasks) > 0, "nothing to evaluate: set perplexity=true or tasks=[...]")
        _check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        _check(self.max_batches is None or self.max_batches > 0, f"max_batches must be positive, got {self.max_batches}")
        _check(self.limit is None or self.limit > 0, f"limit must be positive, got {self.limit}")
        _check(self.num_fewshot is None or self.num_fewshot >= 0, f"num_fewshot must be >= 0, got {self.num_fewshot}")


ROOTS: dict[str, type] = {
    "tokenize": TokenizeConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "peft": PeftRunConfig,
    "generate": GenerateConfig,
    "evaluate": EvaluateConfig,
}

# The alignment roots (reward, dpo, ppo) live in schema_align, which adds them to ROOTS when imported.
import llmkit.config.schema_align  # noqa: E402,F401
