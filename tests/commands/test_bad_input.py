"""The bad-input catalog, through the real CLI in a subprocess.

Every case must end with exit code 2 and ONE line on stderr (`error: ...`) that names the file,
line, field or key at fault and says what to do; never a traceback. Where something was already
on disk (a run, a checkpoint, a user's directory), it must come through byte for byte unchanged.
Pickles offered as weights or training state must be refused without being unpickled: their
payload would create a marker file.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from llmkit.data.prepare import settle_killed_swaps
from llmkit.eval.tasks import tasks_dir


class Payload:
    """Unpickling this creates `marker`: proof that a file was (or, asserted absent, was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_refused(done, *words: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one `error:` line on stderr, containing every one of `words`."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == code, output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself), by relative path, with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, symlinks=True)
    return dest


def latest_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def tiny_model(tiny_run: Path) -> dict:
    """The tiny run's model config (block_size, d_model, vocab_size), so the cases follow the recipe."""
    return json.loads((latest_checkpoint(tiny_run) / "meta.json").read_text())["model"]


def only_setup_files(run: Path) -> bool:
    """A run that failed before training holds at most its config and tokenizer (nothing to lose)."""
    return not run.exists() or {p.name for p in run.iterdir()} <= {"config.yaml", "tokenizer.json"}


# ---------------------------------------------------------------- data

def write_parquet_without_text(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first", "second"], "id": [1, 2]}), path)


def make_dir_without_data(path: Path) -> None:
    path.mkdir()
    (path / "notes.md").write_text("not a corpus\n")
    (path / "image.png").write_bytes(b"\x89PNG")


DATA_CASES = [
    # id, file name, content (bytes, or a function that makes the path), words the message must hold
    ("missing", "missing.txt", None, ["missing.txt", "does not exist", "data.path="]),
    ("empty-file", "empty.txt", b"", ["empty.txt", "empty"]),
    ("blank-lines-only", "blank.txt", b"\n\n   \n\t\n\n", ["blank.txt", "empty"]),
    ("no-text-field", "other.jsonl", b'{"content": "a", "id": 1}\n{"content": "b", "id": 2}\n',
     ["other.jsonl:1", "'text'", "content", "id", "data.text_field="]),
    ("malformed-jsonl", "bad.jsonl", b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n',
     ["bad.jsonl:2", "not valid JSON"]),
    ("malformed-json", "bad.json", b'[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]\n', ["bad.json:3", "not valid JSON"]),
    ("field-wrong-type", "typed.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": 5}\n',
     ["typed.jsonl:3", "'text'", "int", "expected a string"]),
    ("non-utf8-strict", "latin1.txt", b"first document\n\nsecond\ncaf\xe9 au lait\n\nthird\n",
     ["latin1.txt:4", "not valid UTF-8", "data.encoding_errors=replace"]),
    ("csv-without-column", "table.csv", b"id,body\n1,hello\n2,world\n", ["table.csv:1", "'text'", "id, body"]),
    ("csv-ragged-row", "ragged.csv", b'text,id\nhello,1\n"a,b",2,3\n', ["ragged.csv:3", "3 values", "2 columns"]),
    ("parquet-without-column", "table.parquet", write_parquet_without_text, ["table.parquet", "'text'", "body, id"]),
    ("dir-without-data-files", "folder", make_dir_without_data, ["folder", "holds no", ".jsonl"]),
    ("unsupported-suffix", "corpus.xml", b"<doc>text</doc>\n", ["corpus.xml", "'.xml'", ".jsonl"]),
    ("single-document", "one.txt", b"just one document\n", ["1 document", "at least 2"]),
]


@pytest.mark.parametrize(("name", "content", "words"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_corpus_is_refused_naming_file_line_and_field(name, content, words, cli, tmp_path):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        content(path)
    done = cli("tokenize", "tokenizer=bpe512", "data=files", f"data.path={path}", "out_dir=tok")
    assert_refused(done, *words)
    assert not (tmp_path / "tok" / "meta.json").exists()


def test_non_utf8_is_accepted_with_encoding_errors_replace(cli, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"first document\n\nsecond\ncaf\xe9 au lait\n\nthird one here\n")
    done = cli("tokenize", "tokenizer=bpe512", "data=files", f"data.path={path}", "data.encoding_errors=replace",
               "out_dir=tok")
    assert done.returncode == 0, done.stderr
    assert "replaced 1 invalid UTF-8" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "tok" / "meta.json").is_file()


# ---------------------------------------------------------------- config

CONFIG_CASES = [
    ("unknown-key", ["tiny/pretrain", "train.max_step=3"], ["'train.max_step'", "did you mean train.max_steps"]),
    ("added-unknown-key", ["tiny/pretrain", "+train.max_step=3"], ["'train.max_step'", "did you mean train.max_steps"]),
    ("added-unknown-group-key", ["+optim.learning_rate=1e-5"], ["'optim.learning_rate'", "did you mean", "optim.lr"]),
    ("wrong-type", ["tiny/pretrain", "train.max_steps=abc"], ["train.max_steps", "'abc'"]),
    ("negative-lr", ["tiny/pretrain", "optim.lr=-1"], ["optim.lr", "positive", "-1"]),
    ("zero-batch", ["tiny/pretrain", "train.batch_size=0"], ["train.batch_size", "positive"]),
    ("heads-do-not-divide", ["tiny/pretrain", "model.n_head=3"], ["model.d_model=", "model.n_head=3", "divisible"]),
    ("tokenizer-too-small", ["tiny/pretrain", "tokenizer.vocab_size=100"], ["tokenizer.vocab_size=100", "at least 260"]),
    ("unknown-recipe", ["tiny/pretrian"], ["'tiny/pretrian'", "did you mean tiny/pretrain"]),
    ("another-commands-recipe", ["tiny/sft"], ["tiny/sft is a recipe for `llmkit sft`", "llmkit sft tiny/sft",
                                               "tiny/pretrain"]),
    ("unknown-group-option", ["model=gpt3"], ["model=gpt3", "tiny", "small", "gpt2_124m"]),
    ("missing-recipe-file", ["no/such/recipe.yaml"], ["no/such/recipe.yaml", "does not exist"]),
    ("unparsable-override", ["tiny/pretrain", "train.max_steps=["], ["'train.max_steps=['", "key=value"]),
    ("unquoted-special-value", ["tokenizer.eos_token=<|eos|>"], ["quote a value", "tokenizer.eos_token='<|eos|>'"]),
    ("recipe-after-overrides", ["train.max_steps=3", "tiny/pretrain"], ["'tiny/pretrain' is not key=value",
                                                                       "a recipe goes first"]),
    ("mistyped-option", ["--print-confg"], ["unknown option --print-confg", "--print-config"]),
    ("misspelt-group", ["modle.n_layer=2"], ["unknown config key 'modle'", "did you mean model"]),
    ("deleted-key", ["~train.seed"], ["cannot delete train.seed", "train.seed=..."]),
    ("deleted-group", ["~model"], ["cannot delete model", "model=..."]),
    ("unknown-interpolation", ["name=${nowhere}"], ["bad value for 'name': Interpolation key 'nowhere' not found"]),
    ("resume-yes", ["train.resume=true"], ["train.resume must be never, auto, or a checkpoint directory",
                                           "got 'true'", "auto continues the run"]),
]


@pytest.mark.parametrize("args,words", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_pretrain_config_is_refused_before_anything_is_written(args, words, cli, tmp_path):
    assert_refused(cli("pretrain", *args, "out_dir=run"), *words)
    assert not (tmp_path / "run").exists()


RECIPE_FILE_CASES = [
    ("typo", "# @package _global_\ntrain:\n  max_step: 3\n",
     ["unknown config key 'train.max_step' in my.yaml", "did you mean train.max_steps"]),
    ("bad-value", "# @package _global_\ntrain:\n  max_steps: abc\n", ["'train.max_steps' in my.yaml", "'abc'"]),
    ("broken-yaml", "# @package _global_\ntrain:\n  max_steps: [3\n", ["my.yaml line 3", "not valid YAML"]),
    ("a-list", "- train\n- model\n", ["my.yaml must be a mapping of config keys", "not a list"]),
]


@pytest.mark.parametrize("text,words", [c[1:] for c in RECIPE_FILE_CASES], ids=[c[0] for c in RECIPE_FILE_CASES])
def test_a_bad_recipe_file_is_refused_naming_it(text, words, cli, tmp_path):
    (tmp_path / "my.yaml").write_text(text)
    assert_refused(cli("pretrain", "my.yaml", "out_dir=run"), *words)
    assert not (tmp_path / "run").exists()


def test_a_recipe_file_without_a_package_line_sets_global_keys_and_lists_want_brackets(cli, tmp_path):
    (tmp_path / "my.yaml").write_text("train:\n  max_steps: 7\n")
    done = cli("pretrain", "my.yaml", "--print-config")
    assert done.returncode == 0 and "max_steps: 7" in done.stdout, done.stderr
    assert_refused(cli("evaluate", "runs=runs/pt"), "'runs'", "takes a list", "[item]")
    (tmp_path / "list.yaml").write_text("sampling:\n  stop: abc\n")
    assert_refused(cli("generate", "list.yaml"), "'sampling.stop' in list.yaml", "takes a list", "[item]")

def test_merging_a_method_that_cannot_merge_is_refused_before_training(cli, tmp_path):
    assert_refused(cli("peft", "tiny/peft", "peft=prefix", "merge=true", "out_dir=run"),
                   "merge=true", "peft=prefix", "drop merge=true")
    assert not (tmp_path / "run").exists()

def test_a_launch_of_several_processes_reports_a_config_error_once(cli):
    """Every process of `accelerate launch` composes the same arguments: only the main one prints their error.
    (An error raised later may be one process's alone: each reports it, naming its rank: test_cli.)"""
    rank0, rank1 = ({"RANK": str(rank), "WORLD_SIZE": "2"} for rank in (0, 1))
    assert_refused(cli("pretrain", "train.bogus=1", env=rank0), "train.bogus")
    done = cli("pretrain", "train.bogus=1", env=rank1)
    assert done.returncode == 2 and done.stderr == ""
    done = cli("generate", "run=nowhere", env=rank1)  # a one-process command under a launch: refused, by rank 0
    assert done.returncode == 2 and done.stderr == ""
    assert_refused(cli("generate", "run=nowhere", env=rank0), "`llmkit generate` runs in one process")


SAMPLING_CASES = [
    ("top-p-above-one", "sampling.top_p=1.5", ["top_p", "1.5"]),
    ("top-k-zero", "sampling.top_k=0", ["top_k", ">= 1"]),
    ("negative-temperature", "sampling.temperature=-1", ["temperature", ">= 0"]),
    ("overflowing-temperature", "sampling.temperature=1e-39", ["sampling.temperature=1e-39 is below 0.0001", "use 0"]),
    ("empty-stop-string", "sampling.stop=[stop,'']", ["sampling.stop", "empty string", "remove it"]),
    ("unknown-device", "device=gpu", ["device='gpu'", "auto, cpu, cuda"]),
]


@pytest.mark.parametrize("override,words", [c[1:] for c in SAMPLING_CASES], ids=[c[0] for c in SAMPLING_CASES])
def test_bad_sampling_config_is_refused(override, words, cli):
    assert_refused(cli("generate", "run=nowhere", override), *words)


# ---------------------------------------------------------------- model / data mismatch

def test_init_from_another_architecture_names_the_differing_keys_before_tokenising(cli, tiny_run, tmp_path):
    before = snapshot(tiny_run)
    model = tiny_model(tiny_run)
    d, half = model["d_model"], model["d_model"] // 2
    done = cli("pretrain", "tiny/pretrain", f"init_from={tiny_run}", f"model.d_model={half}", "model.n_head=1",
               "data.max_documents=300", "out_dir=run")  # another corpus: a tokenize would show
    message = assert_refused(done, f"init_from={tiny_run} holds another model",
                             f"n_head {model['n_head']} (config: 1), d_model {d} (config: {half})",
                             f"add: model.n_head={model['n_head']} model.d_model={d} (", "drop init_from")
    assert "n_layer" not in message and "tokenized" not in done.stdout
    assert snapshot(tiny_run) == before
    assert only_setup_files(tmp_path / "run")


MISMATCH_CASES = [
    ("seq-len-above-context", ["train.seq_len={twice}"], ["train.seq_len={twice}", "model.block_size={block}"]),
    ("vocab-above-embedding", ["model.vocab_size=100"], ["tokens but model.vocab_size=100", "set model.vocab_size="]),
    ("micro-batch-does-not-divide", ["train.micro_batch_size=3", "train.batch_size=8"],
     ["train.batch_size=8", "train.micro_batch_size=3"]),
    ("tokens-dir-missing", ["tokens_dir=no-shards"], ["no-shards", "llmkit tokenize"]),
]


@pytest.mark.parametrize("args,words", [c[1:] for c in MISMATCH_CASES], ids=[c[0] for c in MISMATCH_CASES])
def test_model_and_data_that_do_not_fit_are_refused(args, words, cli, tiny_run, tmp_path):
    block = tiny_model(tiny_run)["block_size"]
    args, words = ([w.format(block=block, twice=2 * block) for w in ws] for ws in (args, words))
    assert_refused(cli("pretrain", "tiny/pretrain", *args, "out_dir=run"), *words)
    assert only_setup_files(tmp_path / "run")


def test_a_run_that_failed_before_training_does_not_block_the_next_attempt(cli, tiny_run, tmp_path):
    """A failed start removes the directory it made; one it found holding a failed start's config.yaml does not
    refuse the next attempt (other settings) as 'already a run'."""
    assert_refused(cli("pretrain", "tiny/pretrain", "tokens_dir=no-shards", "out_dir=run"), "no-shards")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train:\n  seq_len: 7\n")
    twice = 2 * tiny_model(tiny_run)["block_size"]
    assert_refused(cli("pretrain", "tiny/pretrain", f"train.seq_len={twice}", "out_dir=run"), f"train.seq_len={twice}")
    assert f"seq_len: {twice}" in (tmp_path / "run" / "config.yaml").read_text()


# ---------------------------------------------------------------- weights files

def test_the_pickle_payload_is_live(tmp_path):
    """The marker check below only means something if unpickling the payload really creates the marker."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "sanity")))
    assert (tmp_path / "sanity").exists()


def test_truncated_safetensors_is_refused_by_generate_and_evaluate(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "copy")
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(run)
    assert_refused(cli("generate", f"run={run}", "prompt=Return the"), str(weights), "truncated")
    assert_refused(cli("evaluate", f"runs=[{run}]", "max_batches=1"), str(weights), "truncated")
    assert snapshot(run) == before


def _pickle_as_pt(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"weight": Payload(marker)}, path)
    return path


def _pickle_as_safetensors(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    return path


def _pickle_in_checkpoint(path: Path, marker: Path, tiny_run: Path) -> Path:
    shutil.copytree(latest_checkpoint(tiny_run), path)
    (path / "model.safetensors").write_bytes(pickle.dumps({"weight": Payload(marker)}, protocol=2))
    return path


PICKLE_CASES = [
    # id, how to make it, command, words
    ("torch-save-pt-as-init-from", "model.pt", "init", ["model.pt", "refused", "safetensors"]),
    ("pickle-renamed-safetensors-as-init-from", "model.safetensors", "init", ["model.safetensors", "pickle"]),
    ("pickle-renamed-safetensors-as-run", "model.safetensors", "generate", ["model.safetensors", "pickle"]),
    ("pickle-inside-a-checkpoint", "checkpoint", "generate", ["checkpoint/model.safetensors", "pickle"]),
]


@pytest.mark.parametrize("kind,command,words", [c[1:] for c in PICKLE_CASES], ids=[c[0] for c in PICKLE_CASES])
def test_pickles_offered_as_weights_are_refused_unopened(kind, command, words, cli, tiny_run, tmp_path):
    marker = tmp_path / "UNPICKLED"
    if kind == "model.pt":
        path = _pickle_as_pt(tmp_path / kind, marker)
    elif kind == "model.safetensors":
        path = _pickle_as_safetensors(tmp_path / kind, marker)
    else:
        path = _pickle_in_checkpoint(tmp_path / kind, marker, tiny_run)
    if command == "init":
        done = cli("pretrain", "tiny/pretrain", f"init_from={path}", "out_dir=run")
    else:
        done = cli("generate", f"run={path}", "prompt=Return the")
    assert_refused(done, *words)
    assert not marker.exists(), "the pickle was unpickled"


def test_pickled_training_state_is_refused_unopened_on_resume(cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "copy")
    marker = tmp_path / "UNPICKLED"
    state = latest_checkpoint(run) / "state.pt"
    state.write_bytes(pickle.dumps({"optimizer": Payload(marker)}))
    checkpoints = snapshot(run / "checkpoints")
    assert_refused(cli("pretrain", "tiny/pretrain", f"out_dir={run}", "train.resume=auto", "train.max_steps=32"),
                   str(state), "refused", "train.resume=")
    assert not marker.exists(), "the training state was unpickled"
    assert snapshot(run / "checkpoints") == checkpoints


def test_bare_weights_file_and_broken_checkpoint_metadata_are_refused(cli, tiny_run, tmp_path):
    bare = tmp_path / "weights.safetensors"
    shutil.copyfile(latest_checkpoint(tiny_run) / "model.safetensors", bare)
    assert_refused(cli("generate", f"run={bare}", "prompt=Return the"), str(bare), "checkpoint directory")
    broken = tmp_path / "broken"
    shutil.copytree(latest_checkpoint(tiny_run), broken)
    (broken / "meta.json").write_text("{not json")
    assert_refused(cli("evaluate", f"runs=[{broken}]"), str(broken / "meta.json"))


# ---------------------------------------------------------------- run directories

def test_output_directory_that_cannot_be_created_is_refused(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    assert_refused(cli("pretrain", "tiny/pretrain", f"out_dir={blocker}/run"), f"{blocker}/run", "not writable",
                   "out_dir=")
    assert blocker.read_text() == "keep me\n"


EXISTING_RUN_CASES = [
    ("pretrain-over-a-run", ["pretrain", "tiny/pretrain", "train.max_steps=5"],
     ["already holds a run", "train.resume=auto", "train.overwrite=true"]),
    ("resume-with-a-changed-model", ["pretrain", "tiny/pretrain", "train.resume=auto", "model.n_layer=1"],
     ["cannot resume", "model.n_layer:", "-> 1"]),
    ("tokenize-over-a-run", ["tokenize", "tokenizer=bpe512", "data.max_documents=50"], ["holds more than token shards", "checkpoints", "a training run"]),
]


@pytest.mark.parametrize("args,words", [c[1:] for c in EXISTING_RUN_CASES], ids=[c[0] for c in EXISTING_RUN_CASES])
def test_a_directory_holding_a_run_is_left_untouched(args, words, cli, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "copy")
    before = snapshot(run)
    assert_refused(cli(*args, f"out_dir={run}"), str(run), *words)
    assert snapshot(run) == before


@pytest.mark.parametrize("command", [["pretrain", "tiny/pretrain"], ["tokenize", "tokenizer=bpe512"]],
                         ids=["pretrain", "tokenize"])
def test_a_non_empty_directory_that_is_not_a_run_is_left_untouched(command, cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\section{Results}\n")
    assert_refused(cli(*command, f"out_dir={mine}"), str(mine), "not an llmkit run", "out_dir=")
    assert snapshot(mine) == {"thesis.tex": b"\\section{Results}\n"}


def test_tokenizing_again_into_the_same_directory_works(cli, tmp_path):
    """... keeping a user's hidden files there, and clearing what a killed earlier swap left beside it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: the value of x is {i * 7}" for i in range(20)) + "\n")
    shard_files = {"config.yaml", "meta.json", "tokenizer.json", "train.bin", "val.bin"}
    for attempt in range(2):
        done = cli("tokenize", "tokenizer=bpe512", "data=files", f"data.path={corpus}", "out_dir=tok")
        assert done.returncode == 0, done.stderr
        assert {p.name for p in (tmp_path / "tok").iterdir()} == shard_files | ({".gitignore", ".notes"} if attempt else set())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok"]
        (tmp_path / "tok" / ".gitignore").write_text("*.bin\n")
        (tmp_path / "tok" / ".notes").mkdir(exist_ok=True)
        (tmp_path / "tok" / ".notes" / "todo.txt").write_text("check the split\n")
        for leftover in (".tok.999999999-0123abcd.partial", ".tok.999999999-4567cdef.old"):  # no such process
            (tmp_path / leftover).mkdir()
            (tmp_path / leftover / "train.bin").write_bytes(b"\0\0")
    assert (tmp_path / "tok" / ".gitignore").read_text() == "*.bin\n"
    assert (tmp_path / "tok" / ".notes" / "todo.txt").read_text() == "check the split\n"
    settle_killed_swaps(tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok"]


def test_a_tokenize_killed_between_its_renames_gets_the_earlier_shards_back(tmp_path):
    earlier = tmp_path / ".tok.999999999-89abcdef.old"
    earlier.mkdir()
    (earlier / "meta.json").write_text("{}")
    (tmp_path / ".tok.999999999-89abcdef.partial").mkdir()
    running = tmp_path / f".tok.{os.getpid()}-01234567.partial"  # a live process's: left alone
    running.mkdir()
    settle_killed_swaps(tmp_path / "tok")
    assert (tmp_path / "tok" / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "tok"]


def test_a_failed_re_tokenisation_leaves_the_earlier_shards_untouched(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"doc {i} here is text" for i in range(300)) + "\n")
    assert cli("tokenize", "tokenizer=bpe512", "data=files", f"data.path={corpus}", "out_dir=tok").returncode == 0
    before = snapshot(tmp_path / "tok")
    corpus.write_bytes(corpus.read_bytes() + b"\ncaf\xe9\n")  # the bad byte comes after 300 good documents
    done = cli("tokenize", "tokenizer.path=tok/tokenizer.json", "data=files", f"data.path={corpus}", "out_dir=tok")
    assert_refused(done, "corpus.txt:601", "not valid UTF-8")
    assert snapshot(tmp_path / "tok") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok"]  # nothing left beside it


# ---------------------------------------------------------------- generate

def test_prompt_longer_than_the_context_is_refused(cli, tiny_run):
    prompt = "The value " * 200  # 2,000 characters, several hundred tokens
    block = tiny_model(tiny_run)["block_size"]
    assert_refused(cli("generate", f"run={tiny_run}", f"prompt='{prompt}'"), "tokens", f"context of {block}", "shorten")


PROMPT_CASES = [
    ("empty-prompts-file", b"", ["prompts.txt", "no prompts"]),
    ("blank-prompts-file", b"\n   \n\n", ["prompts.txt", "no prompts"]),
    ("missing-prompts-file", None, ["prompts.txt", "does not exist"]),
    ("empty-prompt", "prompt=''", ["non-empty prompt", "prompts_file="]),
    ("prompt-and-prompts", ["prompt=Once", "prompts=[a,b]"], ["prompt and prompts are set together", "give one"]),
    ("prompts-and-file", ["prompts=[a]", "prompts_file=p.txt"], ["prompts and prompts_file", "ignored"]),
]


@pytest.mark.parametrize("content,words", [c[1:] for c in PROMPT_CASES], ids=[c[0] for c in PROMPT_CASES])
def test_missing_or_empty_prompts_are_refused(content, words, cli, tiny_run, tmp_path):
    if isinstance(content, (str, list)):
        args = [content] if isinstance(content, str) else content
    else:
        if content is not None:
            (tmp_path / "prompts.txt").write_bytes(content)
        args = [f"prompts_file={tmp_path / 'prompts.txt'}"]
    assert_refused(cli("generate", f"run={tiny_run}", *args), *words)


# ---------------------------------------------------------------- evaluate

def test_evaluate_refuses_missing_incomplete_and_too_long(cli, tiny_run, tmp_path):
    assert_refused(cli("evaluate", f"runs=[{tmp_path / 'no-run'}]"), str(tmp_path / "no-run"), "does not exist")
    torn = tmp_path / "torn"
    shutil.copytree(latest_checkpoint(tiny_run), torn)
    (torn / "COMPLETE").unlink()
    assert_refused(cli("evaluate", f"runs=[{torn}]"), str(torn), "COMPLETE", "earlier checkpoint")
    block = tiny_model(tiny_run)["block_size"]
    assert_refused(cli("evaluate", f"runs=[{tiny_run}]", f"seq_len={2 * block}"), f"seq_len={2 * block}", str(block))
    assert_refused(cli("evaluate", f"runs=[{tiny_run}]", "data=files", "data.path=corpus.txt"),  # heldout=run ignored it
                   "data.* is read with heldout=data", "add heldout=corpus or heldout=data")
    assert_refused(cli("evaluate", f"runs=[{tiny_run}]", "seq_len=-5"), "seq_len must be positive")  # wrote NaN results
    # One column per run and rows keyed by task name: a second one of either used to hide the first's results.
    assert_refused(cli("evaluate", f"runs=[{tiny_run},{tiny_run}]"), f"runs names {tiny_run} twice")
    task = tmp_path / "copy.yaml"
    task.write_text((tasks_dir() / "tinyworld_gen.yaml").read_text())
    assert_refused(cli("evaluate", f"runs=[{tiny_run}]", "perplexity=false", f"tasks=[tinyworld_gen,{task}]"),
                   "are both named 'tinyworld_gen'", str(task), "name: key")


def test_evaluate_output_that_cannot_be_written_is_refused(cli, tiny_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    before = snapshot(tiny_run)
    assert_refused(cli("evaluate", f"runs=[{tiny_run}]", "max_batches=1", f"output={blocker}/eval.json"),
                   f"{blocker}/eval.json", "output=")
    assert blocker.read_text() == "keep me\n"
    assert snapshot(tiny_run) == before
