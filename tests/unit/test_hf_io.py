"""HF model directories in and out: an imported save_pretrained directory gives HF's logits through llmkit's
loader; an exported checkpoint loads back in transformers with the same logits and token ids; bad input is refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmkit.commands.common import load_trained
from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.hf import hf_config_dict
from llmkit.model.hf_io import export_hf, import_hf, qwen2_splitting
from llmkit.tokenizer.bpe import train_bpe
from llmkit.tokenizer.chat import resolve_template
from tests.unit.test_hf_parity import randomize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    return train_bpe(docs, 320, ["<|endoftext|>", "<|pad|>"], 2, False)


def hf_model(family: str, vocab: int):
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        torch.manual_seed(0)
        return randomize(transformers.GPT2LMHeadModel(cfg))
    config, model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    cfg = config(vocab_size=vocab, max_position_embeddings=32, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=family == "qwen2")
    torch.manual_seed(0)
    return randomize(model(cfg))


def save_hf_dir(model, tokenizer, path: Path, chat_template: str | None = None) -> Path:
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
              **({"chat_template": chat_template} if chat_template else {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_import_then_export_keeps_the_logits_and_the_tokenizer(family, tokenizer, tmp_path):
    vocab = tokenizer.get_vocab_size()
    tokenizer = qwen2_splitting(tokenizer) if family == "qwen2" else tokenizer
    hf = hf_model(family, vocab)
    source = save_hf_dir(hf, tokenizer, tmp_path / "hf", chat_template="{{ messages[0]['content'] }}")
    tokens = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    reference = logits(hf, tokens)

    checkpoint = import_hf(source, tmp_path / "imported")
    loaded = load_trained(str(checkpoint))
    torch.testing.assert_close(logits(loaded.model, tokens), reference, rtol=1e-4, atol=1e-5)
    assert loaded.meta["eos_token"] == "<|endoftext|>" and loaded.meta["pad_token"] == "<|pad|>"
    assert loaded.meta["chat_template"] == "{{ messages[0]['content'] }}"

    exported = export_hf(str(checkpoint), tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(logits(back, tokens), reference, rtol=1e-4, atol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    text = "def f3(x):\n    return x * 3"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.pad_token == "<|pad|>"


def test_a_llama_3_rope_scaled_model_imports_and_exports_as_saved_by_transformers_4_or_5(tokenizer, tmp_path):
    """Llama 3.1+ stretch rope with the llama3 rope type: config.json holds it as rope_parameters (transformers 5) or
    as rope_scaling next to rope_theta (4.x, as on the hub). Both give HF's logits, and export writes it back."""
    from tests.unit.test_hf_parity import LLAMA3_ROPE

    vocab = tokenizer.get_vocab_size()
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=32, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE))
    torch.manual_seed(0)
    hf = randomize(transformers.LlamaForCausalLM(cfg))
    tokens = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(1))
    reference = logits(hf, tokens)
    new = save_hf_dir(hf, tokenizer, tmp_path / "hf5")
    old = save_hf_dir(hf, tokenizer, tmp_path / "hf4")
    config = json.loads((old / "config.json").read_text())
    params = config.pop("rope_parameters")
    config |= {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    (old / "config.json").write_text(json.dumps(config))
    for source in (new, old):
        checkpoint = import_hf(source, tmp_path / f"imported-{source.name}")
        loaded = load_trained(str(checkpoint))
        assert loaded.model.cfg.rope_scaling == "llama3", source.name
        torch.testing.assert_close(logits(loaded.model, tokens), reference, rtol=1e-4, atol=1e-5)
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(str(checkpoint), tmp_path / "exported")).eval()
    assert back.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(logits(back, tokens), reference, rtol=1e-4, atol=1e-5)


def test_a_qwen2_style_model_with_another_tokenizer_is_not_exported(tokenizer, tmp_path, capsys):
    """AutoTokenizer rebuilds a qwen2 model's tokenizer with Qwen2's splitting: with a GPT-2 style BPE the exported
    directory would tokenize differently in transformers (checked here), so export refuses it."""
    source = save_hf_dir(hf_model("qwen2", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    text = "def f3(x):\n    return x * 3"
    assert hf_tokenizer(text)["input_ids"] != tokenizer.encode(text).ids  # why the refusal is needed
    checkpoint = import_hf(source, tmp_path / "imported")
    assert "splits text otherwise than transformers' Qwen2Tokenizer" in capsys.readouterr().err  # said on import
    refused(lambda: export_hf(str(checkpoint), tmp_path / "out"), "Qwen2Tokenizer", "model.qkv_bias")
    assert not (tmp_path / "out").exists()


def test_gpt2_weights_without_the_transformer_prefix_import(tokenizer, tmp_path):
    """The hub's gpt2 stores GPT2Model names (h.0.attn..., no lm_head): still mapped, and tied."""
    hf = hf_model("gpt2", tokenizer.get_vocab_size())
    source = save_hf_dir(hf, tokenizer, tmp_path / "hf")
    state = load_file(source / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"},
              source / "model.safetensors", metadata={"format": "pt"})
    tokens = torch.arange(12).view(1, 12)
    loaded = load_trained(str(import_hf(source, tmp_path / "imported")))
    torch.testing.assert_close(logits(loaded.model, tokens), logits(hf, tokens), rtol=1e-4, atol=1e-5)


def refused(call, *words):
    with pytest.raises(UserError) as error:
        call()
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_bad_hf_directories_and_exports_are_refused(tokenizer, tmp_path):
    source = save_hf_dir(hf_model("llama", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    refused(lambda: import_hf(tmp_path / "nowhere", tmp_path / "a"), "nowhere", "does not exist")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(lambda: import_hf(source, busy), "busy", "not empty")
    assert (busy / "keep.txt").read_text() == "mine"

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    refused(lambda: import_hf(tmp_path / "bert", tmp_path / "b"), "model_type 'bert'", "gpt2, llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((source / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    refused(lambda: import_hf(pickled, tmp_path / "c"), "pickled weights", "safe_serialization")
    (source / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    refused(lambda: import_hf(source, tmp_path / "d"), "no tokenizer.json", "save_pretrained")
    assert not any((tmp_path / name).exists() for name in "abcd")

    (tmp_path / "tokenizer.json").rename(source / "tokenizer.json")
    small = save_hf_dir(hf_model("llama", 300), tokenizer, tmp_path / "small")  # 300 rows for a 320-token tokenizer
    refused(lambda: import_hf(small, tmp_path / "f"), "320 tokens", "vocab_size=300", "does not belong")
    (tmp_path / "a-file").write_text("mine")
    refused(lambda: import_hf(source, tmp_path / "a-file"), "a-file is a file")
    assert not (tmp_path / "f").exists() and (tmp_path / "a-file").read_text() == "mine"

    checkpoint = import_hf(source, tmp_path / "imported")
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["model"]["mlp"] = "gelu"  # rmsnorm + rope + gelu: neither family
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    refused(lambda: export_hf(str(checkpoint), tmp_path / "e"), "neither", "GPT-2 style", "Llama style")
    llama = ModelConfig(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    assert hf_config_dict(llama, "llama")["num_key_value_heads"] == llama.kv_heads
    refused(lambda: hf_config_dict(llama, "gpt2"), "is llama style, not gpt2")
    adapter = tmp_path / "peft-run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    refused(lambda: export_hf(str(adapter), tmp_path / "g"), "is a PEFT adapter", "merge=true")


def test_the_module_runs_as_a_command_and_its_output_feeds_llmkit(tokenizer, tmp_path):
    source = save_hf_dir(hf_model("gpt2", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    run = [sys.executable, "-m", "llmkit.model.hf_io"]
    done = subprocess.run([*run, "import", str(source), str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"init_from={tmp_path / 'ckpt'}" in done.stdout
    done = subprocess.run([*run, "import", str(tmp_path / "nowhere"), str(tmp_path / "x")], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "llmkit", "generate", f"run={tmp_path / 'ckpt'}", "prompt=def f",
                           "sampling.max_new_tokens=4", "sampling.temperature=0", "chat=false"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def f")
    done = subprocess.run([sys.executable, "-m", "llmkit", "evaluate", f"runs=[{tmp_path / 'ckpt'}]"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "records no validation split" in done.stderr and "heldout=corpus" in done.stderr


BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_a_llama_with_a_bos_token_prompts_as_transformers_does(tmp_path):
    """An HF Llama whose tokenizer adds <s> to a text and whose chat template (in chat_template.jinja) starts with
    bos_token: llmkit's generate gets the same prompt ids as transformers, raw and templated, and the export gives
    the bos, the template and a generation_config back."""
    from tokenizers.processors import TemplateProcessing

    from llmkit.commands.generate import encode_prompt
    from llmkit.tokenizer.chat import BOS_SETTING

    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    tokenizer = train_bpe(docs, 320, ["<|endoftext|>", "<|pad|>", "<s>"], 2, False)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    source = save_hf_dir(hf_model("llama", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s>"}))
    (source / "chat_template.jinja").write_text(BOS_TEMPLATE)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    messages = [{"role": "user", "content": "def f3(x):"}]

    loaded = load_trained(str(import_hf(source, tmp_path / "imported")))
    meta = loaded.meta
    assert meta["bos_token"] == "<s>" and meta["chat_template"] == BOS_SETTING.format('"<s>"') + BOS_TEMPLATE
    raw = encode_prompt(loaded.tokenizer, "def f3(x):", None, meta)
    assert raw[0] == bos_id and raw == hf_tokenizer("def f3(x):")["input_ids"]
    templated = encode_prompt(loaded.tokenizer, "def f3(x):", meta["chat_template"], meta)
    assert templated[0] == bos_id and templated.count(bos_id) == 1
    assert templated == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]

    exported = export_hf(str(loaded.checkpoint), tmp_path / "exported")
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["chat_template"]) == ("<s>", BOS_TEMPLATE)
    generation = transformers.GenerationConfig.from_pretrained(exported)
    assert (generation.bos_token_id, generation.eos_token_id) == (bos_id, tokenizer.token_to_id("<|endoftext|>"))
    assert generation.pad_token_id == tokenizer.token_to_id("<|pad|>")
    back = transformers.AutoTokenizer.from_pretrained(exported)
    assert back.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] == templated


def test_a_list_of_named_chat_templates_imports_the_default_one(tokenizer, tmp_path, capsys):
    named = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": "{{ eos_token }}"}]
    source = save_hf_dir(hf_model("gpt2", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text("\ufeff" + json.dumps({**config, "chat_template": named}))  # a BOM
    meta = load_trained(str(import_hf(source, tmp_path / "imported"))).meta
    assert meta["chat_template"] == "{{ eos_token }}" and "bos_token" not in meta
    without_default = [named[0], {"name": "rag", "template": "{{ documents }}"}]  # transformers refuses to choose
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": without_default}))
    meta = load_trained(str(import_hf(source, tmp_path / "imported-without"))).meta
    assert "chat_template" not in meta
    said = capsys.readouterr().err
    assert "note: imported without a chat template" in said and "named tool_use, rag but none named 'default'" in said
    with pytest.raises(UserError, match="named tool_use, rag but none named 'default'"):
        resolve_template(str(source))


@pytest.mark.parametrize(("window", "context"), [(None, 8192), (16, 16), ("absent", 4096)])
def test_a_saved_mistral_sliding_window_caps_the_context_only_when_set(window, context, tokenizer, tmp_path):
    """config.json's "sliding_window": null means no window (Mistral v0.2+), not MistralConfig's default of 4096."""
    cfg = transformers.MistralConfig(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=8192, hidden_size=32,
                                     intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, sliding_window=None if window == "absent" else window)
    torch.manual_seed(0)
    source = save_hf_dir(randomize(transformers.MistralForCausalLM(cfg)), tokenizer, tmp_path / "hf")
    if window == "absent":  # transformers' default applies: a 4096-token window
        config = json.loads((source / "config.json").read_text())
        del config["sliding_window"]
        (source / "config.json").write_text(json.dumps(config))
    loaded = load_trained(str(import_hf(source, tmp_path / "imported")))
    assert loaded.config.block_size == context and loaded.meta["hf_family"] == "mistral"


def test_a_tokenizer_json_with_a_bom_loads(tokenizer, tmp_path):
    source = save_hf_dir(hf_model("gpt2", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    (source / "tokenizer.json").write_text("\ufeff" + (source / "tokenizer.json").read_text())
    loaded = load_trained(str(import_hf(source, tmp_path / "imported")))
    assert loaded.tokenizer.encode("def f3(x):").ids == tokenizer.encode("def f3(x):").ids


def with_config(source: Path, path: Path, **changes) -> Path:
    """A copy of the HF directory `source` at `path` with config.json keys changed (None: removed)."""
    path.mkdir()
    for file in source.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


def test_config_values_of_the_wrong_type_and_token_ids_past_the_vocabulary_are_refused(tokenizer, tmp_path):
    """A string "false" read as a bool would have tied lm_head to the embeddings (silently other logits); 2.0 layers
    failed deep in the model; a tokenizer id past vocab_size crashed generation after a clean import."""
    source = save_hf_dir(hf_model("llama", tokenizer.get_vocab_size()), tokenizer, tmp_path / "hf")
    for key, value, words in (("tie_word_embeddings", "false", ("true or false", '"false"')),
                              ("num_hidden_layers", 2.0, ("an integer", "2.0")),
                              ("rms_norm_eps", "1e-6", ("a number", '"1e-6"')),
                              ("rope_parameters", {"rope_type": "linear", "factor": "x"}, ("factor", "a number")),
                              ("model_type", None, ("no model_type",))):
        bad, out = with_config(source, tmp_path / key, **{key: value}), tmp_path / f"out-{key}"
        refused(lambda bad=bad, out=out: import_hf(bad, out), str(bad / "config.json"), *words)
        assert not out.exists()
    holed = json.loads(tokenizer.to_str())
    pad = next(t for t in holed["added_tokens"] if t["content"] == "<|pad|>")
    holed["model"]["vocab"]["<|pad|>"] = pad["id"] = 400  # 320 tokens still, the largest id 400
    hole = with_config(source, tmp_path / "hole")
    (hole / "tokenizer.json").write_text(json.dumps(holed))
    refused(lambda: import_hf(hole, tmp_path / "out-hole"), "'<|pad|>' the id 400", "vocab_size=320")


def test_old_llama_checkpoints_with_rotary_buffers_import_and_hf_directories_are_named_where_checkpoints_go(
        tokenizer, tmp_path):
    """transformers 4.2x-4.30 saved rotary_emb.inv_freq buffers (not weights); an HF directory given as a checkpoint
    (run=, init_from=, export) gets the import command instead of "not completely written"."""
    hf = hf_model("llama", tokenizer.get_vocab_size())
    source = save_hf_dir(hf, tokenizer, tmp_path / "hf")
    state = load_file(source / "model.safetensors")
    state |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    tokens = torch.arange(12).view(1, 12)
    loaded = load_trained(str(import_hf(source, tmp_path / "imported")))
    torch.testing.assert_close(logits(loaded.model, tokens), logits(hf, tokens), rtol=1e-4, atol=1e-5)
    for given in (source, source / "model.safetensors"):
        refused(lambda given=given: load_trained(str(given)), "is an HF model directory",
                f"python -m llmkit.model.hf_io import {source}")
    refused(lambda: export_hf(str(source), tmp_path / "out"), "is an HF model directory")
