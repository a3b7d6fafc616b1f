"""Token shards stay true to what they are used with, through the real CLI: the data files they came from,
the tokenizer of the weights they train or score, and the earlier shards a failed re-tokenisation replaces."""

import json
from pathlib import Path

from tests.commands.test_bad_input import assert_refused, only_setup_files, snapshot


def write_corpus(path: Path, template: str, count: int) -> None:
    path.write_text("\n\n".join(template.format(i=i) for i in range(count)) + "\n")


def checkpoint_meta(run: Path) -> dict:
    root = run / "checkpoints"
    return json.loads((root / (root / "latest").read_text().strip() / "meta.json").read_text())


def test_the_shard_cache_follows_what_the_data_files_hold(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, "document {i}: the value of x is {i}.", 200)
    args = ("pretrain", "tiny/pretrain", "data=files", f"data.path={corpus}", "train.max_steps=1")
    assert cli(*args, "out_dir=a").returncode == 0
    write_corpus(corpus, "completely different text number {i}, many more words indeed.", 300)
    done = cli(*args, "out_dir=b")
    assert done.returncode == 0, done.stderr
    shards = Path(checkpoint_meta(tmp_path / "b")["tokens_dir"])
    assert json.loads((shards / "meta.json").read_text())["documents"] == 300


def test_pretrain_from_a_run_keeps_its_tokenizer(cli, tiny_run, tmp_path):
    """Another corpus config (here fewer documents) must not train a new BPE under the checkpoint's embeddings."""
    done = cli("pretrain", "tiny/pretrain", f"init_from={tiny_run}", "data.max_documents=300", "train.max_steps=1",
               "out_dir=more")
    assert done.returncode == 0, done.stderr
    assert "trained tokenizer" not in done.stdout
    theirs = (tiny_run / "tokenizer.json").read_bytes()
    assert (tmp_path / "more" / "tokenizer.json").read_bytes() == theirs
    assert Path(checkpoint_meta(tmp_path / "more")["tokens_dir"], "tokenizer.json").read_bytes() == theirs


def test_shards_of_another_tokenizer_are_refused_wherever_weights_read_them(cli, tmp_path):
    """Shards re-tokenised with another tokenizer after a run trained on them: evaluating the run, resuming it
    and starting from it with those shards are each refused naming the shards and the run's tokenizer."""
    tokenize = ("tokenize", "tokenizer=bpe512", "out_dir=tok")
    assert cli(*tokenize, "data.max_documents=300").returncode == 0
    assert cli("pretrain", "tiny/pretrain", "tokens_dir=tok", "train.max_steps=1", "out_dir=run").returncode == 0
    assert cli(*tokenize, "data.max_documents=200").returncode == 0  # another corpus, another BPE
    run = tmp_path / "run"
    before = snapshot(run)
    cases = [(("evaluate", "runs=[run]", "output=eval.json"), "heldout=data"),
             (("pretrain", "tiny/pretrain", "tokens_dir=tok", "train.max_steps=2", "train.resume=auto", "out_dir=run"),
              "tokens_dir"),
             (("pretrain", "tiny/pretrain", "tokens_dir=tok", "init_from=run", "out_dir=next"), "tokens_dir")]
    for args, fix in cases:
        assert_refused(cli(*args), "tok were encoded with", "tok/tokenizer.json", "run/checkpoints/step_000001", fix)
    assert snapshot(run) == before
    assert not (tmp_path / "eval.json").exists() and only_setup_files(tmp_path / "next")


def test_a_resume_on_edited_data_under_the_same_settings_and_tokenizer_is_refused(cli, tiny_run, tmp_path):
    """The shards' checksums (meta.json) go into each checkpoint: a resume on other tokens would not continue the run."""
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, "document {i}: the value of x is {i}.", 200)
    args = ("pretrain", "tiny/pretrain", "data=files", f"data.path={corpus}", f"tokenizer.path={tiny_run}/tokenizer.json",
            "out_dir=run", "logger.tensorboard=false")
    assert cli(*args, "train.max_steps=1").returncode == 0
    run = tmp_path / "run"
    before = snapshot(run)
    write_corpus(corpus, "document {i}: the value of x is {i}.", 201)  # one more document
    done = cli(*args, "train.max_steps=2", "train.resume=auto")
    assert_refused(done, "cannot resume run/checkpoints/step_000001", "data differ", "restore them", "init_from=")
    assert snapshot(run) == before
    write_corpus(corpus, "document {i}: the value of x is {i}.", 200)  # restored (a new mtime: tokenised again)
    done = cli(*args, "train.max_steps=2", "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout


def test_a_run_on_shards_of_another_tokenizer_keeps_their_end_and_padding_tokens(cli, tmp_path):
    """tokens_dir written with a tokenizer whose specials are </s> and <pad>: the run's checkpoints used to record
    the default <|endoftext|> / <|pad|> (not in its vocabulary), and a later sft from it failed."""
    from llmkit.tokenizer.bpe import train_bpe

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, "alpha beta gamma {i} delta river cloud", 60)
    train_bpe(corpus.read_text().split("\n\n"), 300, ["</s>", "<pad>"]).save(str(tmp_path / "own.json"))
    assert cli("tokenize", "tokenizer=bpe512", "data=files", f"data.path={corpus}", f"tokenizer.path={tmp_path / 'own.json'}",
               "tokenizer.eos_token='</s>'", "tokenizer.pad_token='<pad>'", "tokenizer.special_tokens=['</s>','<pad>']",
               "out_dir=tok").returncode == 0
    assert cli("pretrain", "tiny/pretrain", "tokens_dir=tok", "train.max_steps=1", "out_dir=run").returncode == 0
    meta = checkpoint_meta(tmp_path / "run")
    assert (meta["eos_token"], meta["pad_token"]) == ("</s>", "<pad>")


def test_an_empty_validation_split_is_said_and_early_stopping_without_one_is_refused(cli, tiny_run, tmp_path):
    """40 one-line documents: the held-out ones are shorter than a training window, so nothing is validated."""
    corpus = tmp_path / "small.txt"
    write_corpus(corpus, "word{i} is here", 40)
    args = ("pretrain", "tiny/pretrain", "data=files", f"data.path={corpus}", "data.max_documents=null",
            "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=2", "train.eval_every=1")
    done = cli(*args, "out_dir=quiet")
    assert done.returncode == 0 and "note: no validation examples" in done.stdout and "| val_loss" not in done.stdout
    assert_refused(cli(*args, "train.early_stopping_patience=2", "out_dir=refused"),
                   "train.early_stopping_patience needs validation examples", "data.val_fraction")
    assert not (tmp_path / "refused").exists()
    done = cli("sft", "tiny/sft", f"init_from={tiny_run}", "train.max_steps=1", "out_dir=sft")
    assert done.returncode == 0 and "40 held out (0 truncated, 0 dropped)" in done.stdout, done.stdout
