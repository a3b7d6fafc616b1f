"""HF transformers model directories (GPT-2, Llama, Mistral, Qwen2) in and out of llmkit checkpoints.

    python -m llmkit.model.hf_io import <HF model directory> <checkpoint directory>
    python -m llmkit.model.hf_io export <run or checkpoint> <HF model directory>

An import is written as a merged PEFT model is (`<out>/step_000000` and a `latest` pointer, through
`write_model_checkpoint`): every command takes `<out>` as `init_from=` or `run=`. An exported directory loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. Neither needs transformers: config.json
is JSON, weights are safetensors (a pickled pytorch_model.bin is refused), names go through `llmkit.model.hf`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.hf import (
    ARCHITECTURES,
    FAMILIES,
    config_from_hf,
    family_of,
    family_of_config,
    hf_config_dict,
    state_dict_from_hf,
    state_dict_to_hf,
)
from llmkit.tokenizer.chat import BOS_SETTING, hf_directory_template, token_name

# What transformers assumes when config.json leaves a key out (GPT2Config / LlamaConfig defaults).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "rope_theta": 10000.0, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "rope_theta": 10000.0, "use_sliding_window": False, "sliding_window": 4096},
}
NULL_MEANS = ("sliding_window", "num_key_value_heads")  # null: no window; as many key/value heads as heads
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# transformers' Qwen2Tokenizer (forced by AutoTokenizer for model_type qwen2) rebuilds NFC + this split + ByteLevel
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
               r"""\s+(?!\S)|\s+""")
SPLIT_PROBE = ("It's 2024-11-25; I'VE said: café, naïve, Å\u0301! x  =  f12(y)\r\n\n\tdef g(_a):\n    return a**2  # ok?\n"
               "数字123 über—«quotes» 'll 'D \u00a0end   ")


# The JSON types of the config.json keys llmkit reads (transformers refuses other types too): a string "false"
# read as a bool would be true, and 2.0 layers would fail deep inside the model.
KEY_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "hidden_size",
                     "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "max_position_embeddings", "sliding_window", "head_dim"), (int,)),
    **dict.fromkeys(("layer_norm_epsilon", "rms_norm_eps", "rope_theta"), (int, float)),
    **dict.fromkeys(("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings", "attention_bias",
                     "mlp_bias", "use_sliding_window"), (bool,)),
    **dict.fromkeys(("activation_function", "hidden_act"), (str,)),
    **dict.fromkeys(("rope_scaling", "rope_parameters"), (dict,)),
}


def _check_types(path: Path, settings: dict[str, Any]) -> None:
    """UserError naming the first key of config.json whose value has a type transformers would refuse."""
    for key, types in KEY_TYPES.items():
        value = settings.get(key)
        if value is None or (isinstance(value, types) and (bool in types or not isinstance(value, bool))):
            continue
        kind = {(int,): "an integer", (int, float): "a number", (bool,): "true or false", (str,): "a string",
                (dict,): "an object"}[types]
        raise UserError(f"{path}: {key} must be {kind} in JSON, got {json.dumps(value)}; fix config.json (transformers "
                        "refuses it too)")


def read_hf_config(hf_dir: Path) -> tuple[ModelConfig, str]:
    """Our ModelConfig and the family of an HF model directory's config.json."""
    path = hf_dir / "config.json"
    raw = _json_object(path, f"{hf_dir} has no config.json: pass an HF model directory (save_pretrained's output)")
    if "model_type" not in raw:
        raise UserError(f"{path} has no model_type (save_pretrained writes one); llmkit maps model types "
                        f"{', '.join(FAMILIES)}")
    family = family_of(SimpleNamespace(model_type=raw.get("model_type")))
    defaults = HF_DEFAULTS[family]  # a key left out takes its default; null too, except where null means "none"
    settings = {**defaults, **{k: v for k, v in raw.items() if v is not None or k not in defaults or k in NULL_MEANS}}
    _check_types(path, settings)
    if family != "gpt2" and settings["num_key_value_heads"] is None:
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    try:
        cfg = config_from_hf(SimpleNamespace(**settings))
    except (TypeError, ValueError, AttributeError, UserError) as error:  # a setting we refuse, or do not default
        raise UserError(f"{path}: {error}") from None
    return dataclasses.replace(cfg, name=hf_dir.resolve().name), family


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of an HF model directory: model.safetensors, or the shards its index names."""
    if (hf_dir / WEIGHTS).is_file():
        return [hf_dir / WEIGHTS]
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text(encoding="utf-8-sig"))["weight_map"]
            return [hf_dir / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{hf_dir / INDEX} is not a safetensors index ({error!r})") from None
    if any(hf_dir.glob("*.bin")):
        raise UserError(f"{hf_dir} holds pickled weights (*.bin) only: refused, since unpickling can run code; save "
                        "the model with safe_serialization=True (the default of save_pretrained) first")
    raise UserError(f"{hf_dir} has neither {WEIGHTS} nor {INDEX}")


def read_hf_weights(files: list[Path], family: str) -> dict[str, Any]:
    """One HF state dict from safetensors files (GPT2Model names get GPT2LMHeadModel's `transformer.` prefix)."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise UserError(f"{file} is not a readable safetensors file ({error})") from None
    if family == "gpt2" and not any(k.startswith("transformer.") for k in state):  # GPT2Model names (the hub's gpt2)
        state = {k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in state.items()}
    return state


def import_hf(hf_dir: Path, out: Path) -> Path:
    """Write the HF model at `hf_dir` as an llmkit checkpoint under `out` (fp32 weights); returns the checkpoint."""
    from llmkit.commands.common import write_model_checkpoint
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer.bpe import load_tokenizer
    from llmkit.train import checkpoint as ckpt

    if not hf_dir.is_dir():
        raise UserError(f"HF model directory {hf_dir} does not exist")
    _refuse_non_empty(out)
    cfg, family = read_hf_config(hf_dir)
    files = weight_files(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json (a fast tokenizer's file): save the tokenizer with "
                        "AutoTokenizer.from_pretrained(...).save_pretrained(dir) first")
    tokenizer = load_tokenizer(hf_dir / "tokenizer.json")
    if family == "qwen2" and not _splits_as_qwen2(tokenizer):
        print(f"note: {hf_dir}/tokenizer.json splits text otherwise than transformers' Qwen2Tokenizer, which "
              "AutoTokenizer uses for a qwen2 model: llmkit uses tokenizer.json as it is", file=sys.stderr)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"{hf_dir}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, more than the model's "
                        f"vocab_size={cfg.vocab_size} in config.json: the tokenizer does not belong to this model")
    token, top = max(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    if top >= cfg.vocab_size:
        raise UserError(f"{hf_dir}: tokenizer.json gives {token!r} the id {top}, past the model's vocab_size="
                        f"{cfg.vocab_size} in config.json (its embeddings have rows 0..{cfg.vocab_size - 1}): fix the "
                        "token's id, or the tokenizer does not belong to this model")
    special = _json_object(hf_dir / "tokenizer_config.json")
    eos = token_name(special.get("eos_token")) or "<|endoftext|>"
    if tokenizer.token_to_id(eos) is None:
        raise UserError(f"{hf_dir}: its end-of-text token {eos!r} is not in tokenizer.json; set eos_token in "
                        "tokenizer_config.json")
    model = Transformer(cfg)
    tensors = {k: v.float() for k, v in state_dict_from_hf(read_hf_weights(files, family), cfg, family).items()}
    ckpt.load_weights(model, tensors, hf_dir)
    meta = {"command": "import", "hf_source": str(hf_dir.resolve()), "hf_family": family, "eos_token": eos,
            "pad_token": token_name(special.get("pad_token")) or eos}
    bos = token_name(special.get("bos_token"))
    if bos and tokenizer.token_to_id(bos) is not None:
        meta["bos_token"] = bos
    try:
        template = hf_directory_template(hf_dir)
    except UserError as error:  # named templates with no default: the weights import; the template is chosen later
        template = None
        print(f"note: imported without a chat template: {error} (data.chat_template= to fine-tune, generate "
              "chat_template= to chat)", file=sys.stderr)
    if template is not None:  # generate, evaluate, sft, ... then wrap prompts in it
        meta["chat_template"] = template
    return write_model_checkpoint(model, out, meta, hf_dir / "tokenizer.json")


def export_hf(source: str, out: Path) -> Path:
    """Write the model of a run or checkpoint as an HF model directory `out` (config, weights, tokenizer)."""
    from llmkit.data.prepare import replaced_on_success
    from llmkit.fileio import save_safetensors
    from llmkit.tokenizer.bpe import load_tokenizer
    from llmkit.train import checkpoint as ckpt

    adapter = ("is a PEFT adapter: export the merged model (`llmkit peft merge=true` writes <peft run>/merged), "
               "or the base model it adapts")
    if (Path(source) / "adapter_config.json").is_file():  # a PEFT run's adapter/ directory
        raise UserError(f"{source} {adapter}")
    checkpoint = ckpt.resolve_checkpoint(source)
    meta = ckpt.read_meta(checkpoint)
    if meta.get("kind") == "adapter" or (checkpoint / "adapter_config.json").exists():
        raise UserError(f"{checkpoint} {adapter}")
    if meta.get("kind") == "reward" or "model" not in meta:
        raise UserError(f"{checkpoint} holds no language model to export (reward models and foreign checkpoints "
                        "have no HF causal-LM equivalent)")
    _refuse_non_empty(out)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    family = family_of_config(cfg)
    tensors = ckpt.read_tensors(checkpoint / ckpt.WEIGHTS)
    if cfg.tie_embeddings:
        tensors.setdefault("lm_head.weight", tensors["tok_emb.weight"])
    hf_state = state_dict_to_hf(tensors, cfg, family)
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight")  # transformers ties it to the input embedding
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    if family == "qwen2" and not _splits_as_qwen2(tokenizer):
        raise UserError(f"{checkpoint} is a Qwen2-style model (biases on q/k/v only), and transformers loads a qwen2 "
                        "model's tokenizer as Qwen2Tokenizer, which re-splits text with its own rules: its token ids "
                        "would differ from this run's tokenizer. Only a model trained with a Qwen2 tokenizer (e.g. one "
                        "imported from a Qwen2 directory) can be exported; otherwise set model.qkv_bias to model.bias")
    eos, bos = meta.get("eos_token", "<|endoftext|>"), meta.get("bos_token")
    pad = meta.get("pad_token")
    pad = pad if pad and tokenizer.token_to_id(pad) is not None else None
    ids = {"bos_token_id": tokenizer.token_to_id(bos or eos), "eos_token_id": tokenizer.token_to_id(eos),
           **({"pad_token_id": tokenizer.token_to_id(pad)} if pad else {})}
    config = {**hf_config_dict(cfg, family), "architectures": [ARCHITECTURES[family]], "model_type": family,
              "torch_dtype": "float32", **ids}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                        "eos_token": eos, "bos_token": bos or eos, **({"pad_token": pad} if pad else {})}
    if meta.get("chat_template"):
        from llmkit.tokenizer.chat import resolve_template

        template = resolve_template(meta["chat_template"])
        if bos and template.startswith(BOS_SETTING.format(json.dumps(bos))):  # HF passes bos_token itself
            template = template.removeprefix(BOS_SETTING.format(json.dumps(bos)))
        tokenizer_config["chat_template"] = template
    with replaced_on_success(out, "choose another output directory") as tmp:
        save_safetensors(hf_state, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        shutil.copyfile(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
    return out


def qwen2_splitting(tokenizer):
    """`tokenizer`'s vocabulary under Qwen2's normalizer and pre-tokenizer: what transformers' Qwen2Tokenizer builds."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    qwen2 = Tokenizer.from_str(tokenizer.to_str())
    qwen2.normalizer = normalizers.NFC()
    qwen2.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return qwen2


def _splits_as_qwen2(tokenizer) -> bool:
    """Whether Qwen2Tokenizer gives the same ids as `tokenizer` on a probe text of digits, contractions, accents,
    whitespace runs and punctuation."""
    return qwen2_splitting(tokenizer).encode(SPLIT_PROBE).ids == tokenizer.encode(SPLIT_PROBE).ids


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another output directory")


def _json_object(path: Path, missing: str | None = None) -> dict[str, Any]:
    """A JSON object file. Optional (`missing` None): {} when absent or not an object; else UserError(`missing`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        if missing is None:
            return {}
        raise UserError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({error})") from None
    if isinstance(data, dict) or missing is None:
        return data if isinstance(data, dict) else {}
    raise UserError(f"{path} is not a JSON object")


USAGE = """usage: python -m llmkit.model.hf_io import <HF model directory> <checkpoint directory>
       python -m llmkit.model.hf_io export <run or checkpoint> <HF model directory>"""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) != 3 or argv[0] not in ("import", "export"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        if argv[0] == "import":
            import_hf(Path(argv[1]), Path(argv[2]))
            print(f"wrote {argv[2]}: use it as init_from={argv[2]} or run={argv[2]}")
        else:
            out = export_hf(argv[1], Path(argv[2]))
            print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
