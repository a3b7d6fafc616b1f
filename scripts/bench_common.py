"""Shared pieces of scripts/bench.py: result rows, settings, alternation, peak samples and the model pairs."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
LLAMA_STYLE = dict(norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False, bias=False)


@dataclass
class Row:
    """One comparison: medians of both sides (peer None when there is no peer), the goal and whether it is met."""

    section: str
    case: str
    ours: float
    peer: float | None
    unit: str
    peer_name: str = ""
    note: str = ""
    goal: str = ""
    met: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None


@dataclass
class Settings:
    """The run's options and the peak samples collected along the way."""

    threads: int
    quick: bool
    reps: int
    experiments: bool = False  # also time llmkit variants (suggested model/loop changes) against llmkit
    peaks: list[float] = field(default_factory=list)  # GFLOP/s samples; the best is the peak

    @property
    def peak(self) -> float:
        return max(self.peaks) * 1e9


def alternate(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each side's measurement `reps` times, flipping the order every round (ABBA...)."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            out[name].append(sides[name]())
    return out


def sample_peak(st: Settings, n: int = 2048) -> None:
    """One fp32 n x n matmul, timed; appended to st.peaks (GFLOP/s)."""
    a, b = torch.full((n, n), 0.5), torch.full((n, n), 0.25)
    start = time.perf_counter()
    a @ b
    st.peaks.append(2 * n**3 / (time.perf_counter() - start) / 1e9)


# ----- models -----------------------------------------------------------------------------------
def model_configs(quick: bool) -> dict[str, ModelConfig]:
    """The benchmark shapes: ~14M (conf/model/gpt2_14m.yaml) and ~30M; a toy shape with --quick."""
    if quick:
        return {"toy": ModelConfig(name="toy", vocab_size=512, block_size=64, n_layer=2, n_head=2, d_model=64)}
    import yaml

    return {"14M": ModelConfig(**yaml.safe_load((ROOT / "conf/model/gpt2_14m.yaml").read_text())),
            "30M": ModelConfig(name="gpt2_30m", vocab_size=8192, block_size=256, n_layer=8, n_head=8, d_model=512)}


def family_cfg(base: ModelConfig, family: str) -> ModelConfig:
    """The same dims GPT-2 style (as given) or Llama style (RMSNorm, RoPE, SwiGLU, untied, no bias)."""
    if family == "gpt2":
        return base
    return ModelConfig(**{**asdict(base), "name": base.name + "_llama", **LLAMA_STYLE})


def build_pair(cfg: ModelConfig, family: str) -> tuple[Transformer, Any]:
    """Our Transformer and the HF model of the same architecture with the same weights (SDPA attention)."""
    import transformers

    from llmkit.model.hf import config_to_hf, state_dict_to_hf

    transformers.logging.set_verbosity_error()  # config_to_hf's GPT-2 defaults warn about bos/eos 50256

    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf_cfg = config_to_hf(cfg, family)
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = None  # the family defaults (50256; 2) are not our tokens
    hf_cfg.pad_token_id = 0
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg, family))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None
