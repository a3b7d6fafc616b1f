"""Shared test set-up: one thread (the other core may be busy), offline hubs, fp32."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One llmkit cache for the whole session, so the tiny corpus is tokenised once."""
    path = tmp_path_factory.mktemp("llmkit-cache")
    os.environ["LLMKIT_CACHE"] = str(path)
    return path


def cli_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LLMKIT_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("LLMKIT_DEBUG", None)
    return env


def run_llmkit(cache: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """The real `llmkit` CLI in a subprocess, in the test environment plus `env` (e.g. what a launcher sets)."""
    return subprocess.run([sys.executable, "-m", "llmkit", *args], cwd=cwd, env={**cli_env(cache), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(cache_dir, tmp_path):
    """Run the real `llmkit` CLI in a subprocess (cwd: the test's tmp dir); returns CompletedProcess."""

    def run(*args: str, timeout: float = 300, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        return run_llmkit(cache_dir, *args, cwd=cwd or tmp_path, env=env, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tmp_path_factory) -> Path:
    """A finished tiny pretrain run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    done = run_llmkit(cache_dir, "pretrain", "tiny/pretrain", f"out_dir={out}")
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="session")
def tiny_sft(tiny_run, cache_dir, tmp_path_factory) -> Path:
    """A finished tiny SFT run on `tiny_run`: the base of the alignment tests (they write beside it)."""
    out = tmp_path_factory.mktemp("align") / "sft"
    done = run_llmkit(cache_dir, "sft", "tiny/sft", f"init_from={tiny_run}", f"out_dir={out}",
                      "logger.tensorboard=false", cwd=out.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return out
