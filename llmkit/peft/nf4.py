"""4-bit NormalFloat (NF4) weights for QLoRA (Dettmers et al. 2023), in pure PyTorch.

A weight is cut into blocks of `block_size` values; each block is divided by its absolute
maximum and every value is replaced by the index of the nearest of the 16 NF4 levels (quantiles
of a standard normal, so equally many normally distributed weights fall on each level). Two
4-bit indices are packed per uint8. Double quantisation also stores the fp32 absmax scales in 8
bits: the scales minus their mean, per group of 256 blocks divided by their absmax and rounded to
int8 (the paper uses 8-bit floats for this second level; int8 is what portable torch offers), which
brings the scale overhead from 32/64 = 0.5 to about 8/64 = 0.127 bits per weight. The layer
dequantises on the fly in forward (CPU or GPU); bitsandbytes is not needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.peft.lora import LoRAMixin

# The 16 NF4 levels, as in the QLoRA paper and bitsandbytes (an exact 0 and an extra positive level).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
SCALE_GROUP = 256  # blocks per second-level scale (double quantisation)
_TINY = 1e-12  # guards the division of an all-zero block or scale group


def _levels(device: torch.device) -> Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)  # (16,)


def _quantize_scales(absmax: Tensor) -> dict[str, Tensor]:
    """absmax (n_blocks,) fp32 -> int8 codes (n_blocks,), fp32 group scales (n_groups,), fp32 mean ()."""
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, (-absmax.numel()) % SCALE_GROUP)).view(-1, SCALE_GROUP)  # (G, 256)
    group_scale = centred.abs().amax(dim=1).clamp(min=_TINY)  # (G,)
    codes = torch.round(centred / group_scale[:, None] * 127).to(torch.int8).flatten()[: absmax.numel()]
    return {"absmax_codes": codes, "absmax_scales": group_scale, "absmax_mean": mean}


def _dequantize_scales(parts: dict[str, Tensor]) -> Tensor:
    codes = parts["absmax_codes"]
    groups = F.pad(codes.float(), (0, (-codes.numel()) % SCALE_GROUP)).view(-1, SCALE_GROUP)  # (G, 256)
    return (groups / 127 * parts["absmax_scales"][:, None]).flatten()[: codes.numel()] + parts["absmax_mean"]


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = False) -> dict[str, Tensor]:
    """NF4-quantise a tensor: {"codes": uint8 (ceil(numel / block_size) * block_size / 2,), two codes a byte,
    high nibble first; "absmax": fp32 (n_blocks,)} or, with double_quant, the absmax as
    {"absmax_codes", "absmax_scales", "absmax_mean"}. The last block is zero-padded."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    flat = weight.detach().float().flatten()
    blocks = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = blocks / absmax.clamp(min=_TINY)[:, None]  # in [-1, 1]
    levels = _levels(weight.device)
    codes = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()  # nearest level
    parts = {"codes": (codes[0::2] << 4) | codes[1::2]}
    parts.update(_quantize_scales(absmax) if double_quant else {"absmax": absmax})
    return parts


def dequantize_nf4(parts: dict[str, Tensor], shape: torch.Size | tuple[int, ...], block_size: int) -> Tensor:
    """The fp32 tensor of `shape` that `quantize_nf4` parts stand for."""
    packed = parts["codes"]
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).flatten().long()  # (n_blocks * block_size,)
    absmax = parts["absmax"] if "absmax" in parts else _dequantize_scales(parts)  # (n_blocks,)
    values = _levels(packed.device)[codes].view(-1, block_size) * absmax[:, None]
    return values.flatten()[: math.prod(shape)].view(shape)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 parts (buffers `weight_<part>`) and
    dequantised to the compute dtype in every forward; the bias stays a (frozen) Parameter."""

    def __init__(self, base: nn.Linear, block_size: int = 64, double_quant: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.block_size = block_size
        self.compute_dtype = base.weight.dtype
        parts = quantize_nf4(base.weight, block_size, double_quant)
        self.part_names = tuple(parts)
        for name, tensor in parts.items():
            self.register_buffer(f"weight_{name}", tensor)
        self.register_parameter("bias", base.bias)

    def dequantized_weight(self) -> Tensor:
        """The weight (out, in) as the forward pass uses it."""
        parts = {name: getattr(self, f"weight_{name}") for name in self.part_names}
        weight = dequantize_nf4(parts, (self.out_features, self.in_features), self.block_size)
        return weight.to(self.compute_dtype)

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight (codes and scales), to compare with 4 * in * out for fp32."""
        return sum(getattr(self, f"weight_{n}").numel() * getattr(self, f"weight_{n}").element_size()
                   for n in self.part_names)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4_block_size={self.block_size}, "
                f"double_quant={'absmax_codes' in self.part_names}")


class QLoRALinear(LoRAMixin, NF4Linear):
    """QLoRA: an NF4 base (frozen, dequantised on the fly) plus a full-precision LoRA update."""

    def __init__(self, base: nn.Linear, block_size: int, double_quant: bool, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False) -> None:
        NF4Linear.__init__(self, base, block_size, double_quant)
        self._init_lora(self.in_features, self.out_features, base.weight, rank, alpha, dropout, rslora)

    def forward(self, x: Tensor) -> Tensor:
        y = NF4Linear.forward(self, x)
        return y + self.lora_delta(x) if self.peft_enabled else y

    def merged_weight(self) -> Tensor:
        """dequantised W + scale * B A (out, in): merging lands on the dequantised base, not the original."""
        return self.dequantized_weight() + self.delta_weight()


def nf4_memory(model: nn.Module) -> tuple[int, int]:
    """(bytes the NF4 weights take, bytes the same weights take in fp32) over the model's NF4 layers."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.quantized_bytes() for m in layers), sum(4 * m.in_features * m.out_features for m in layers)


@torch.no_grad()
def fake_quantize_nf4_(model: nn.Module, block_size: int = 64, double_quant: bool = False) -> float:
    """Replace, in place, every nn.Linear weight inside `model.blocks` (the layers qlora quantises) by
    its NF4 round trip, so the quantisation's effect on loss/perplexity can be measured with the
    ordinary model. Returns the relative error ||W - W_q|| / ||W|| over all those weights."""
    err_sq, norm_sq = 0.0, 0.0
    for module in model.blocks.modules():
        if type(module) is nn.Linear:
            w = module.weight
            wq = dequantize_nf4(quantize_nf4(w, block_size, double_quant), w.shape, block_size).to(w.dtype)
            err_sq += float((w.double() - wq.double()).pow(2).sum())
            norm_sq += float(w.double().pow(2).sum())
            w.copy_(wq)
    return math.sqrt(err_sq / max(norm_sq, _TINY))
