"""Explicit parameter-name maps between HF transformers models and ours (GPT-2, Llama, Mistral, Qwen2).

GPT2LMHeadModel stores its linear layers as Conv1D, whose weight is (in, out): ours are nn.Linear
(out, in), so every matrix is transposed, and c_attn fuses q, k, v along the output. Our RoPE uses
HF Llama's rotate_half convention, so LlamaForCausalLM weights map one to one without permutation;
Mistral and Qwen2 use Llama's names (Qwen2 adds biases to q, k and v only: our `qkv_bias`).
Vocabulary padding never reaches these maps: `Transformer.state_dict()` holds only the vocab_size real
rows and `load_state_dict` appends the zero padded rows, so HF configs and weights keep the real vocab.
transformers is imported lazily: it is a dev extra only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # Llama's layout and parameter names


def family_of(hf_config: Any) -> str:
    """Our family name for an HF config (its model_type), or UserError when we cannot map it."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"HF model_type {model_type!r} is not supported; llmkit maps {', '.join(FAMILIES)}")
    return model_type


def _rope_settings(hf_config: Any) -> dict[str, Any]:
    """Our model.rope_* settings from an HF Llama-like config: theta, and the default, linear or llama3 rope type.

    transformers 5 keeps them in rope_parameters; 4.x in rope_theta and rope_scaling (which 5 also reads first).
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or params
    theta = _number(scaling, "rope_theta", float, _number(params, "rope_theta", float,
                                                          getattr(hf_config, "rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3") or scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"HF rope scaling {scaling!r} is not supported; llmkit reads the default, linear and llama3 "
                        "(Llama 3.1+) rope types over the whole head")
    if kind == "default":
        return {"rope_theta": theta}
    needed = ("factor", "low_freq_factor", "high_freq_factor") if kind == "llama3" else ("factor",)
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise UserError(f"HF rope scaling {scaling!r} lacks {', '.join(missing)}, which rope type {kind} needs")
    settings = {"rope_theta": theta, "rope_scaling": kind, "rope_factor": _number(scaling, "factor", float)}
    if kind == "llama3":
        settings |= {"rope_original_context": _number(scaling, "original_max_position_embeddings", int,
                                                      hf_config.max_position_embeddings),
                     "rope_low_freq_factor": _number(scaling, "low_freq_factor", float),
                     "rope_high_freq_factor": _number(scaling, "high_freq_factor", float)}
    return settings


def _number(settings: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """settings[key] (or `default` when absent) as int or float; UserError naming the key when it is no number."""
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UserError(f"HF rope setting {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """HF's rope_parameters (transformers 5) and rope_scaling (4.x) for our model.rope_* settings."""
    params: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                              "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        params |= {"original_max_position_embeddings": cfg.rope_original_context,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor}
    return params


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our ModelConfig for an HF GPT-2, Llama, Mistral or Qwen2 config. dropout is set to 0 (a training choice)."""
    family = family_of(hf_config)
    name = getattr(hf_config, "_name_or_path", "") or family
    tie = bool(getattr(hf_config, "tie_word_embeddings", True))
    if family == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation {hf_config.activation_function!r} is not supported (tanh GELU only)")
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise UserError("GPT-2 configs with non-standard attention scaling are not supported")
        return ModelConfig(
            name=name, vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
            n_layer=hf_config.n_layer, n_head=hf_config.n_head, d_model=hf_config.n_embd,
            d_ff=hf_config.n_inner or 4 * hf_config.n_embd, norm="layernorm", pos="learned", mlp="gelu",
            tie_embeddings=tie, bias=True, dropout=0.0, norm_eps=hf_config.layer_norm_epsilon,
        )
    if hf_config.hidden_act != "silu":
        raise UserError(f"{family} activation {hf_config.hidden_act!r} is not supported (silu / SwiGLU only)")
    bias, qkv_bias = _llama_like_biases(hf_config, family)
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise UserError(f"{family} configs with head_dim * num_attention_heads != hidden_size are not supported")
    return ModelConfig(
        name=name, vocab_size=hf_config.vocab_size, block_size=_context(hf_config, family),
        n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads, d_model=hf_config.hidden_size,
        d_ff=hf_config.intermediate_size, norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=tie,
        bias=bias, qkv_bias=qkv_bias, dropout=0.0, norm_eps=hf_config.rms_norm_eps, **_rope_settings(hf_config),
    )


def _llama_like_biases(hf_config: Any, family: str) -> tuple[bool, bool | None]:
    """(bias, qkv_bias) of a Llama-like config: Qwen2 has q/k/v biases only, Mistral none, Llama its two switches."""
    if family == "qwen2":
        return False, True
    if family == "mistral":
        return False, None
    attn_bias, mlp_bias = bool(hf_config.attention_bias), bool(getattr(hf_config, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise UserError("Llama configs need attention_bias == mlp_bias (llmkit has one model.bias switch)")
    return attn_bias, None


def _context(hf_config: Any, family: str) -> int:
    """The context length: max_position_embeddings, capped at the sliding window when one is used.

    Within its window a sliding-window layer attends to every earlier token, as full attention does, so
    the capped model computes exactly what the HF one does on sequences that fit.
    """
    context = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if family == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    return min(context, window) if window else context


ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def family_of_config(cfg: ModelConfig) -> str:
    """The HF family that holds `cfg`'s architecture (gpt2, llama or qwen2), or UserError naming what does not fit."""
    same_bias = cfg.attn_qkv_bias == cfg.bias
    if (cfg.norm, cfg.pos, cfg.mlp, cfg.bias, same_bias, cfg.kv_heads) == (
            "layernorm", "learned", "gelu", True, True, cfg.n_head):
        return "gpt2"
    if (cfg.norm, cfg.pos, cfg.mlp) == ("rmsnorm", "rope", "swiglu") and (same_bias or cfg.attn_qkv_bias):
        return "llama" if same_bias else "qwen2"
    raise UserError(f"model {cfg.name!r} (norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp}, bias={cfg.bias}, "
                    f"qkv_bias={cfg.qkv_bias}) is neither GPT-2 style (layernorm, learned, gelu, biases, no GQA) nor "
                    "Llama style (rmsnorm, rope, swiglu; biases everywhere, nowhere, or on q/k/v only as Qwen2): no HF "
                    "architecture holds it")


def hf_config_dict(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The HF config.json settings of `family` (GPT2Config, LlamaConfig, ...) describing the same architecture as `cfg`."""
    if family not in FAMILIES:
        raise UserError(f"unknown HF family {family!r}; expected one of {', '.join(FAMILIES)}")
    style = family_of_config(cfg)
    if style != family and (family, style, cfg.bias) != ("mistral", "llama", False):  # Mistral: Llama without biases
        raise UserError(f"model {cfg.name!r} is {style} style, not {family}")
    if family == "gpt2":
        return dict(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.ff_dim, activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    common = dict(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
        rope_parameters=_rope_parameters(cfg),
    )
    if cfg.rope_scaling != "none":
        common["rope_scaling"] = _rope_parameters(cfg)  # what transformers 4.x reads (and 5 reads first)
    if family == "qwen2":
        return {**common, "use_sliding_window": False, "sliding_window": None}
    if family == "mistral":
        return {**common, "sliding_window": None}
    return {**common, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def config_to_hf(cfg: ModelConfig, family: str) -> Any:
    """An HF GPT2Config, LlamaConfig or Qwen2Config describing the same architecture as `cfg`."""
    import transformers

    return transformers.AutoConfig.for_model(family, **hf_config_dict(cfg, family))


def _llama_names(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> HF LlamaForCausalLM (Mistral, Qwen2) name, for every parameter (one-to-one, no reshaping)."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    params = ["weight", "bias"] if cfg.bias else ["weight"]
    qkv_params = ["weight", "bias"] if cfg.attn_qkv_bias else ["weight"]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        names[f"{ours}.attn_norm.weight"] = f"{theirs}.input_layernorm.weight"
        names[f"{ours}.mlp_norm.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for p in qkv_params if proj != "o_proj" else params:
                names[f"{ours}.attn.{proj}.{p}"] = f"{theirs}.self_attn.{proj}.{p}"
        for p in params:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names[f"{ours}.mlp.{proj}.{p}"] = f"{theirs}.mlp.{proj}.{p}"
    return names


def _gpt2_names(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> HF GPT2LMHeadModel name for the parameters that map one to one (q/k/v excluded)."""
    names = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
             "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
             "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for p in ("weight", "bias"):
            names[f"{ours}.attn_norm.{p}"] = f"{theirs}.ln_1.{p}"
            names[f"{ours}.mlp_norm.{p}"] = f"{theirs}.ln_2.{p}"
            names[f"{ours}.attn.o_proj.{p}"] = f"{theirs}.attn.c_proj.{p}"
            names[f"{ours}.mlp.up_proj.{p}"] = f"{theirs}.mlp.c_fc.{p}"
            names[f"{ours}.mlp.down_proj.{p}"] = f"{theirs}.mlp.c_proj.{p}"
    return names


def _names(cfg: ModelConfig, family: str) -> dict[str, str]:
    if family == "gpt2":
        return _gpt2_names(cfg)
    if family in LLAMA_LIKE:
        return _llama_names(cfg)
    raise UserError(f"unknown HF family {family!r}; expected one of {', '.join(FAMILIES)}")


def _is_conv1d_matrix(name: str) -> bool:
    """GPT-2 Conv1D weights stored (in, out); embeddings, norms and lm_head are not."""
    return name.endswith(".weight") and (".attn.c_" in name or ".mlp.c_" in name)


def state_dict_from_hf(hf_state_dict: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """Our state dict (keys of Transformer(cfg).state_dict()) from an HF GPT-2 or Llama state dict."""
    names = _names(cfg, family)
    sd = dict(hf_state_dict)
    if cfg.tie_embeddings:  # tied checkpoints often omit lm_head.weight
        sd["lm_head.weight"] = sd.get(names["tok_emb.weight"])
    out: dict[str, Tensor] = {}
    for ours, theirs in names.items():
        if sd.get(theirs) is None:
            raise UserError(f"HF {family} weights have no {theirs!r} (needed for {ours!r})")
        w = sd[theirs]
        out[ours] = w.t() if family == "gpt2" and _is_conv1d_matrix(theirs) else w
    if family == "gpt2":
        d = cfg.d_model
        for i in range(cfg.n_layer):
            w = sd[f"transformer.h.{i}.attn.c_attn.weight"].t()  # (3d, d): q, k, v stacked
            b = sd[f"transformer.h.{i}.attn.c_attn.bias"]  # (3d,)
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"blocks.{i}.attn.{proj}.weight"] = w[j * d : (j + 1) * d]
                out[f"blocks.{i}.attn.{proj}.bias"] = b[j * d : (j + 1) * d]
    expected = set(names.values())
    if family == "gpt2":
        expected |= {f"transformer.h.{i}.attn.c_attn.{p}" for i in range(cfg.n_layer) for p in ("weight", "bias")}
    # Old checkpoints carry buffers that are not weights: GPT-2's attention masks (attn.bias, attn.masked_bias),
    # Llama's rotary frequencies (rotary_emb.inv_freq, saved by transformers 4.2x-4.30).
    buffers = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
    extra = [k for k in sd if k not in expected and not k.endswith(buffers)]
    if extra:
        raise UserError(f"HF {family} weights have keys llmkit cannot map (a different architecture?): {extra[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_to_hf(state_dict: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """An HF GPT2LMHeadModel / LlamaForCausalLM state dict from ours (inverse of state_dict_from_hf)."""
    out: dict[str, Tensor] = {}
    for ours, theirs in _names(cfg, family).items():
        w = state_dict[ours]
        out[theirs] = (w.t() if family == "gpt2" and _is_conv1d_matrix(theirs) else w).contiguous()
    if family == "gpt2":
        for i in range(cfg.n_layer):
            attn = f"blocks.{i}.attn"
            qkv = [state_dict[f"{attn}.{p}_proj.weight"] for p in "qkv"]
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()  # (d, 3d)
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([state_dict[f"{attn}.{p}_proj.bias"] for p in "qkv"])
    return out


def transformer_from_hf(hf_model: Any) -> Transformer:
    """Our Transformer with the weights of an HF GPT-2, Llama, Mistral or Qwen2 causal LM (in fp32)."""
    cfg = config_from_hf(hf_model.config)
    model = Transformer(cfg)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg, family_of(hf_model.config)))
    return model
