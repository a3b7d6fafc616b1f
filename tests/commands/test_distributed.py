"""Two processes on CPU (gloo): `launcher.num_processes=2` (DDP) and `accelerate launch` with the shipped FSDP
config give the result of one process, and resume exactly; a DeepSpeed launch llmkit cannot run is refused clearly
(DeepSpeed runs themselves: test_deepspeed.py)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.commands.common import load_trained
from tests.commands.test_resume import assert_same_run, final_weights, last_logged_step, wait_for
from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["pretrain", "tiny/pretrain", "train.max_steps=12", "train.save_every=4", "train.log_every=1",
        "logger.tensorboard=false"]


def test_two_processes_match_one_and_resume_after_a_kill_a_ctrl_c_or_one_process_signalled(cli, cache_dir, tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert cli(*ARGS, f"out_dir={one}").returncode == 0
    done = cli(*ARGS, f"out_dir={two}", "launcher.num_processes=2")
    assert done.returncode == 0, done.stderr
    latest = (two / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (two / "checkpoints" / latest).glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    a, b = final_weights(one), final_weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=0, atol=1e-5)
    # Kill the whole two-process job mid-run, then resume it: identical to the uninterrupted two-process run.
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *ARGS, f"out_dir={killed}", "launcher.num_processes=2"],
                            cwd=tmp_path, env=cli_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    wait_for(lambda: last_logged_step(killed) >= 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = cli(*ARGS, f"out_dir={killed}", "launcher.num_processes=2", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(killed, two)
    assert load_file(str(killed / "checkpoints" / "step_000012" / "model.safetensors"))
    # Ctrl-C: SIGINT to the whole process group, as a terminal sends it (each process gets it, and llmkit's
    # launcher passes it on): both stop after one agreed step, save once, exit 130 with one message.
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *ARGS, f"out_dir={stopped}", "launcher.num_processes=2"],
                            cwd=tmp_path, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    wait_for(lambda: last_logged_step(stopped) >= 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert err.count("stopped by SIGINT at step") == 1 and err.count("SIGINT received") == 1
    assert "Traceback" not in err
    step = int(err.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert 3 <= step < 12 and (stopped / "checkpoints" / f"step_{step:06d}" / "COMPLETE").is_file()
    done = cli(*ARGS, f"out_dir={stopped}", "launcher.num_processes=2", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(stopped, two)
    # SIGTERM to rank 1 alone (as a cluster scheduler may send it): rank 0 learns of it through the per-step vote,
    # so both stop after the same step and save one complete checkpoint. Without the vote rank 1 would save while
    # rank 0 went on with the next step's collectives (a hang or a mismatch, not exit 143).
    alone = tmp_path / "alone"
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *ARGS, f"out_dir={alone}", "launcher.num_processes=2"],
                            cwd=tmp_path, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    wait_for(lambda: last_logged_step(alone) >= 3, proc)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    assert err.count("stopped by another process's signal at step") == 1 and "Traceback" not in err
    step = int(err.split("signal at step ")[1].split(";")[0])
    saved = alone / "checkpoints" / f"step_{step:06d}"
    assert 3 <= step < 12 and (saved / "COMPLETE").is_file()
    assert sorted(p.name for p in saved.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    done = cli(*ARGS, f"out_dir={alone}", "launcher.num_processes=2", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert_same_run(alone, two)


def worker_pid(launcher: int, rank: int) -> int:
    """The process id of `launcher.num_processes`'s worker of this rank (a child with RANK=<rank>)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")



FSDP_CONFIG = ROOT / "conf" / "accelerate" / "fsdp.yaml"
FSDP_ARGS = ["pretrain", "tiny/pretrain", "train.max_steps=8", "train.save_every=4", "train.log_every=1",
             "logger.tensorboard=false"]


def accelerate_launch(cache_dir, tmp_path, config: Path, *args: str, options: tuple[str, ...] = ()
                      ) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config> --num_processes 2 <options> -m llmkit ...`: what a user types."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
              *options, "-m", "llmkit", *args]
    return subprocess.run(launch, cwd=tmp_path, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)


def test_fsdp_on_two_cpu_processes_matches_one_saves_full_weights_and_resumes(cli, cache_dir, tmp_path):
    """conf/accelerate/fsdp.yaml on CPU (gloo): FSDP2 full sharding of each Block gives the 1-process run."""
    one, fsdp, resumed = tmp_path / "one", tmp_path / "fsdp", tmp_path / "resumed"
    assert cli(*FSDP_ARGS, f"out_dir={one}").returncode == 0
    done = accelerate_launch(cache_dir, tmp_path, FSDP_CONFIG, *FSDP_ARGS, f"out_dir={fsdp}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FSDP2: 2 Block units and the root sharded over 2 processes" in done.stdout
    a, b = final_weights(one), final_weights(fsdp)
    assert sorted(a) == sorted(b)  # one consolidated file of full (unsharded) weights, tied weights once
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, fsdp)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=0, atol=1e-5)
    # The optimizer state is saved full (keyed by parameter name): stop at step 4, resume to 8, same result.
    assert accelerate_launch(cache_dir, tmp_path, FSDP_CONFIG, *FSDP_ARGS, f"out_dir={resumed}",
                             "train.max_steps=4").returncode == 0
    done = accelerate_launch(cache_dir, tmp_path, FSDP_CONFIG, *FSDP_ARGS, f"out_dir={resumed}", "train.resume=auto")
    assert done.returncode == 0, done.stdout + done.stderr
    c = final_weights(resumed)
    for name in b:
        torch.testing.assert_close(c[name], b[name], rtol=0, atol=1e-6)
    # The checkpoint loads in a fresh single-process model, and generation runs from it.
    loaded = load_trained(str(fsdp))
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, a.get(name, a["tok_emb.weight"] if name == "lm_head.weight" else None),
                                   rtol=0, atol=1e-5)
    assert cli("generate", f"run={fsdp}", "prompt=Return the", "sampling.max_new_tokens=4").returncode == 0


def test_fsdp_with_a_padded_vocabulary_matches_one_process(cli, cache_dir, tmp_path):
    """Vocabulary 520 is padded to 576 rows (model.pad_vocab_multiple=64): the state-dict hooks that strip and add
    the padding run on sharded parameters; the consolidated checkpoint holds 520 rows and equals one process."""
    args = [*FSDP_ARGS, "model=tiny_llama", "model.vocab_size=520", "train.max_steps=4"]
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert cli(*args, f"out_dir={one}").returncode == 0
    done = accelerate_launch(cache_dir, tmp_path, FSDP_CONFIG, *args, f"out_dir={fsdp}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "returned a view tensor" not in done.stderr
    a, b = final_weights(one), final_weights(fsdp)
    assert sorted(a) == sorted(b) and b["tok_emb.weight"].shape[0] == b["lm_head.weight"].shape[0] == 520
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    loaded = load_trained(str(fsdp))
    assert loaded.model.lm_head.weight.shape[0] == 576 and not loaded.model.lm_head.weight[520:].any()
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, a[name], rtol=0, atol=1e-5)


def test_a_deepspeed_launch_llmkit_cannot_run_gives_one_clear_message(cli, cache_dir, tmp_path):
    """What `accelerate launch` puts in the environment for a DeepSpeed config that sets gradient_clipping."""
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}
    done = cli("pretrain", "tiny/pretrain", f"out_dir={tmp_path / 'ds'}", env=env)
    assert done.returncode == 2
    assert "deepspeed_zero2.yaml" in done.stderr and "Traceback" not in done.stderr
    if importlib.util.find_spec("deepspeed") is None:
        assert "pip install deepspeed" in done.stderr
    else:
        assert "gradient_clipping: 1.0" in done.stderr and "optim.grad_clip" in done.stderr
    assert not (tmp_path / "ds").exists()


def test_a_pair_objective_on_two_processes_through_the_launcher_matches_one(cli, tiny_sft, tmp_path):
    """`llmkit reward launcher.num_processes=2`: the same losses, held-out accuracy and weights as one process."""
    args = ["reward", "tiny/reward", f"init_from={tiny_sft}", "train.max_steps=4", "train.eval_every=4",
            "train.log_every=1", "logger.tensorboard=false"]
    for out, extra in ((tmp_path / "one", []), (tmp_path / "two", ["launcher.num_processes=2"])):
        done = cli(*args, f"out_dir={out}", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    for key in ("loss", "grad_norm", "accuracy"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-5), key
    for key in ("val_loss", "val_accuracy"):
        assert two[-1][key] == pytest.approx(one[-1][key], abs=1e-5), key
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def two_nodes(cache_dir: Path, args: list[str], cwds: tuple[Path, Path], caches: tuple[Path, Path]
              ) -> list[subprocess.CompletedProcess]:
    """What a user runs on each of two nodes (`torchrun --nnodes 2 --node_rank i ...`), here both on this machine:
    a node's working directory and LLMKIT_CACHE are its own, as on machines that share no filesystem."""
    from llmkit.launcher import _free_port

    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "static", "--master_addr", "127.0.0.1",
                               "--master_port", port, "-m", "llmkit", *args], cwd=cwds[rank],
                              env={**cli_env(cache_dir), "LLMKIT_CACHE": str(caches[rank])},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    return [subprocess.CompletedProcess(proc.args, proc.returncode, *out) for proc, out in zip(procs, outs)]


def test_two_nodes_refuse_a_run_directory_or_data_they_do_not_share_and_train_when_they_do(cli, cache_dir, tmp_path):
    """Without a shared run directory a two-node run trained, then crashed at its first checkpoint ("Parent
    directory ... does not exist"), and each node read its own corpus file unchecked. Now: one message before
    training, nothing left behind; a node with its own LLMKIT_CACHE tokenizes its own copy and the run is the
    one-process run."""
    args = ["pretrain", "tiny/pretrain", "train.max_steps=4", "train.log_every=1", "logger.tensorboard=false",
            "data.source=files", "data.path=corpus.txt", "data.max_documents=null"]
    nodes, caches = (tmp_path / "node0", tmp_path / "node1"), (tmp_path / "cache0", tmp_path / "cache1")
    text = "\n\n".join(f"Document {i}: the {i % 7} quick foxes jump over {i % 5} lazy dogs." for i in range(120))
    for node in nodes:
        node.mkdir()
        (node / "corpus.txt").write_text(text)
    done = two_nodes(cache_dir, [*args, "out_dir=runs/a"], nodes, caches)  # relative: a directory per node
    assert all(d.returncode == 1 and "exitcode  : 2 " in d.stderr for d in done), done[0].stderr + done[1].stderr
    assert "process(es) 1 (host" in done[0].stderr and "cannot see the run directory" in done[0].stderr
    assert "process 1:" not in done[1].stderr and "internal error" not in done[0].stderr + done[1].stderr
    assert not (nodes[0] / "runs").exists() and not (nodes[1] / "runs").exists()
    (nodes[1] / "corpus.txt").write_text(text.replace("foxes", "cats"))
    done = two_nodes(cache_dir, [*args, f"out_dir={tmp_path / 'shared'}"], nodes, caches)
    assert all(d.returncode == 1 and "exitcode  : 2 " in d.stderr for d in done)  # torchrun's 1: a worker's 2
    assert "process(es) 1 and process 0 read different training or validation data" in done[0].stderr
    assert not (tmp_path / "shared").exists()
    (nodes[1] / "corpus.txt").write_text(text)
    done = two_nodes(cache_dir, [*args, f"out_dir={tmp_path / 'shared'}"], nodes, caches)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr + done[1].stderr
    assert any((caches[1] / "tokens").iterdir())  # node 1 tokenized its own copy
    one = cli(*args, f"out_dir={tmp_path / 'one'}", cwd=nodes[0])
    assert one.returncode == 0, one.stderr
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "shared")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_an_error_of_the_main_process_alone_is_one_message(cli, tmp_path):
    """The main process refuses the corpus while the other waits for it: that one's lost connection used to add
    "process 1: internal error: RuntimeError: ... Connection closed by peer" under the real message."""
    (tmp_path / "one.txt").write_text("a single document\n")
    done = cli("pretrain", "tiny/pretrain", "data.source=files", "data.path=one.txt", "launcher.num_processes=2",
               f"out_dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: the corpus has 1 document(s); at least 2 are needed to hold one "
                                                "out for validation: add text (.txt documents are separated by blank "
                                                "lines)"]
    assert not (tmp_path / "run").exists()
