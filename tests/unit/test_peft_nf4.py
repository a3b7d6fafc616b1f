"""NF4: the levels, nearest-level codes packed two per byte, round-trip error, double quantisation, memory."""

import math

import pytest
import torch

from llmkit.peft.apply import apply_peft
from llmkit.peft.config import PeftConfig
from llmkit.peft.nf4 import (
    NF4_VALUES,
    NF4Linear,
    _dequantize_scales,
    dequantize_nf4,
    fake_quantize_nf4_,
    nf4_memory,
    quantize_nf4,
)
from tests.unit.peft_testing import lm_loss, make_base, tokens

LEVELS = torch.tensor(NF4_VALUES)


def gaussian(shape=(256, 256), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_levels_are_the_normal_quantiles_of_the_paper():
    """bitsandbytes' construction: 8 positive and 7 negative N(0,1) quantiles and an exact 0, scaled to [-1, 1]."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((pos, torch.zeros(1, dtype=torch.float64), neg)).sort().values
    torch.testing.assert_close(levels / levels.abs().max(), LEVELS.double(), rtol=0, atol=1e-6)
    assert len(NF4_VALUES) == 16 and NF4_VALUES[7] == 0.0


def test_codes_are_nearest_levels_packed_two_per_byte():
    w = gaussian((64, 48))
    parts = quantize_nf4(w, block_size=64)
    assert parts["codes"].dtype == torch.uint8 and parts["codes"].numel() == w.numel() // 2
    assert parts["absmax"].shape == (w.numel() // 64,)
    blocks = w.flatten().view(-1, 64)
    normed = blocks / blocks.abs().amax(1, keepdim=True)
    nearest = (normed[..., None] - LEVELS).abs().argmin(-1).flatten()  # brute force
    packed = parts["codes"]
    unpacked = torch.stack((packed >> 4, packed & 15), -1).flatten()  # high nibble first
    assert torch.equal(unpacked.long(), nearest)
    torch.testing.assert_close(parts["absmax"], blocks.abs().amax(1))


def test_levels_round_trip_exactly_and_zeros_stay_zero():
    w = (LEVELS.repeat(8) * 3.0).view(8, 16)  # every block's absmax is 3: each value is a level times 3
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(w), w.shape, 64), w, rtol=0, atol=0)
    z = torch.zeros(5, 64)
    assert torch.equal(dequantize_nf4(quantize_nf4(z), z.shape, 64), z)


@pytest.mark.parametrize("shape", [(256, 256), (33, 7), (3, 100)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_small(shape, double_quant):
    w = gaussian(shape)
    wq = dequantize_nf4(quantize_nf4(w, 64, double_quant), w.shape, 64)
    assert wq.shape == w.shape and wq.dtype == torch.float32
    rel = ((wq - w).norm() / w.norm()).item()
    assert rel < 0.11  # about 0.09 for Gaussian weights
    # Each value lies within half the widest gap between levels (0.152) times its block's absmax.
    flat = torch.nn.functional.pad(w.flatten(), (0, (-w.numel()) % 64)).view(-1, 64)
    bound = flat.abs().amax(1, keepdim=True) * LEVELS.diff().max() / 2 * (1.02 if double_quant else 1.0) + 1e-7
    err = torch.nn.functional.pad((wq - w).flatten(), (0, (-w.numel()) % 64)).view(-1, 64)
    assert (err.abs() <= bound).all()


def test_double_quantisation_stores_8_bit_scales():
    w = gaussian((512, 512))  # 4096 blocks: 16 scale groups
    plain, dq = quantize_nf4(w, 64), quantize_nf4(w, 64, double_quant=True)
    assert set(dq) == {"codes", "absmax_codes", "absmax_scales", "absmax_mean"}
    assert dq["absmax_codes"].dtype == torch.int8 and dq["absmax_codes"].numel() == 4096
    assert dq["absmax_scales"].shape == (16,) and dq["absmax_mean"].shape == ()
    assert torch.equal(dq["codes"], plain["codes"])
    scale_err = (_dequantize_scales(dq) - plain["absmax"]).abs() / plain["absmax"]
    assert scale_err.max() < 0.05 and scale_err.mean() < 0.01


def test_memory_figures():
    layer = torch.nn.Linear(256, 256)
    fp32 = 4 * 256 * 256
    plain, dq = NF4Linear(layer, 64), NF4Linear(layer, 64, double_quant=True)
    assert plain.quantized_bytes() == 256 * 256 // 2 + 4 * 1024  # 4.5 bits per weight
    assert dq.quantized_bytes() == 256 * 256 // 2 + 1024 + 4 * 4 + 4  # about 4.127 bits per weight
    assert plain.quantized_bytes() / fp32 == pytest.approx(4.5 / 32)
    assert dq.quantized_bytes() / fp32 < 4.13 / 32
    assert "weight" not in dict(plain.named_parameters()) and set(plain.state_dict()) == {
        "weight_codes", "weight_absmax", "bias"}


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_model_reports_its_base_memory(double_quant):
    model = make_base("llama")
    info = apply_peft(model, PeftConfig(method="qlora", double_quant=double_quant))
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7  # every linear of every block is quantised
    n = sum(m.in_features * m.out_features for m in layers)
    assert (info.nf4_bytes, info.fp32_bytes) == nf4_memory(model)
    assert info.fp32_bytes == 4 * n

    def expected_bytes(weights: int) -> int:
        blocks = math.ceil(weights / 64)
        scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
        return blocks * 64 // 2 + scales

    assert info.nf4_bytes == sum(expected_bytes(m.in_features * m.out_features) for m in layers)
    assert info.nf4_bytes < 0.15 * info.fp32_bytes


def test_fake_quantisation_measures_the_quantisation_effect():
    model, reference = make_base("gpt2"), make_base("gpt2")
    x = tokens(4, 32)
    rel = fake_quantize_nf4_(model)
    assert 0.05 < rel < 0.11
    assert not torch.equal(model.blocks[0].mlp.up_proj.weight, reference.blocks[0].mlp.up_proj.weight)
    assert torch.equal(model.tok_emb.weight, reference.tok_emb.weight)  # embeddings stay full precision
    with torch.no_grad():
        change = abs(lm_loss(model, x).item() - lm_loss(reference, x).item())
    assert change < 1e-2


def test_odd_block_size_is_refused():
    with pytest.raises(ValueError, match="positive even"):
        quantize_nf4(torch.zeros(4, 4), block_size=3)
