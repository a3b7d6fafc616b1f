"""The built wheel carries conf/ and recipes/: an installed llmkit works outside the repository."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installed_wheel_finds_configs_and_recipes_outside_the_repo(tmp_path):
    isolation = [] if importlib.util.find_spec("setuptools") else ["--use-pep517"]
    flags = ["--no-build-isolation"] if not isolation else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *flags, "-w", str(tmp_path / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("llmkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "llmkit/conf/pretrain.yaml" in names and "llmkit/recipes/tiny/pretrain.yaml" in names
    shipped = {f"llmkit/conf/accelerate/{p.name}" for p in (ROOT / "conf" / "accelerate").glob("*.yaml")}
    assert len(shipped) == 5 and shipped <= set(names)  # the accelerate configs for DDP, FSDP, DeepSpeed, multi-node
    assert {"llmkit/conf/data/fineweb_edu.yaml", "llmkit/recipes/gpu/llama_1b.yaml"} <= set(names)
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "import llmkit.config.compose as c; print(c.config_roots()[0])"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(site)), probe.stdout
    shown = subprocess.run([sys.executable, "-m", "llmkit", "pretrain", "tiny/pretrain", "--print-config"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "name: tiny" in shown.stdout
