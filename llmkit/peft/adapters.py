"""Hook-based PEFT methods: Houlsby bottleneck adapters, BitFit and IA3.

None of them replaces a base module or renames a base tensor: each adds new Parameters (new
state-dict names, listed per method below) and a forward hook, so base checkpoints load unchanged
and `peft_enabled = False` on the carrying module turns the method off (`disable_adapters`).
Hooks are module-level functions or bound methods of modules inside the model, so a deep copy of
the model carries working hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BottleneckAdapter(nn.Module):
    """Houlsby et al. 2019: h + up(gelu(down(h))), placed on a sublayer's output before the residual add.

    New names: blocks.{i}.attn_adapter.{down,up}.{weight,bias} and the same for mlp_adapter.
    `up` starts at zero, so a fresh adapter is the identity and step 0 equals the base. It is
    registered on the Block (not wrapped around `attn`/`mlp`, which would rename their tensors) and
    applied by a forward hook on the sublayer.
    """

    def __init__(self, d_model: int, size: int, like: Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, size, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(size, d_model, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.peft_enabled = True

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h), approximate="tanh"))  # (B, T, d)

    def after_sublayer(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook for the wrapped sublayer: pass its output through the adapter."""
        return self(output) if self.peft_enabled else None


def add_bottleneck_adapters(model: nn.Module, size: int) -> list[str]:
    """Attach an adapter after every block's attention and MLP; returns the new modules' names."""
    names = []
    for i, block in enumerate(model.blocks):
        like = block.attn.o_proj.weight
        for sublayer in ("attn", "mlp"):
            adapter = BottleneckAdapter(like.size(0), size, like)
            block.add_module(f"{sublayer}_adapter", adapter)
            getattr(block, sublayer).register_forward_hook(adapter.after_sublayer)
            names.append(f"blocks.{i}.{sublayer}_adapter")
    return names


def _add_bias_delta(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    return output + module.bias_delta if module.peft_enabled else None


def add_bias_delta(module: nn.Linear | nn.LayerNorm) -> None:
    """BitFit (Ben Zaken et al. 2022) on one layer: a trainable `bias_delta` (out,), zero at start,
    added to the output. The effective bias is bias + bias_delta (bias_delta alone on a layer built
    without bias, e.g. Llama style): training it is training the bias, while the base bias stays
    frozen and untouched, so the adapter can be switched off and saved apart. New name:
    <layer>.bias_delta."""
    like = module.weight
    size = module.out_features if isinstance(module, nn.Linear) else like.size(-1)
    module.bias_delta = nn.Parameter(torch.zeros(size, device=like.device, dtype=like.dtype))
    module.peft_enabled = True
    module.register_forward_hook(_add_bias_delta)


def _scale_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    return output * module.ia3_scale if module.peft_enabled else None


def _scale_input(module: nn.Module, args: tuple) -> tuple | None:
    return (args[0] * module.ia3_scale, *args[1:]) if module.peft_enabled else None


def add_ia3(module: nn.Linear, on_input: bool) -> None:
    """IA3 (Liu et al. 2022) on one linear layer: a trainable vector `ia3_scale`, ones at start, that
    rescales the layer's output channels (keys, values: per kv channel, before RoPE, as HF PEFT) or,
    with on_input, its input (down_proj: the MLP hidden activation). New name: <layer>.ia3_scale."""
    like = module.weight
    size = module.in_features if on_input else module.out_features
    module.ia3_scale = nn.Parameter(torch.ones(size, device=like.device, dtype=like.dtype))
    module.ia3_on_input = on_input
    module.peft_enabled = True
    if on_input:
        module.register_forward_pre_hook(_scale_input)
    else:
        module.register_forward_hook(_scale_output)


@torch.no_grad()
def merged_hooked_linear(module: nn.Module, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The plain (weight, bias) equivalent to `weight`/`bias` with the module's IA3 and BitFit hooks. An lm_head's
    `weight` comes without its padded vocabulary rows (the state dict's): its output scale is cut to match."""
    if hasattr(module, "ia3_scale"):
        scale = module.ia3_scale
        if module.ia3_on_input:
            weight = weight * scale[None, :]  # x*s @ W^T = x @ (W diag(s))^T; the bias is untouched
        else:
            scale = scale[:weight.shape[0]]
            weight = weight * scale[:, None]
            bias = bias * scale if bias is not None else None
    if hasattr(module, "bias_delta"):
        bias = module.bias_delta.clone() if bias is None else bias + module.bias_delta
    return weight, bias
