"""float8 bases with scales are scored against the W0 their layout documents.

* compressed-tensors' ``float-quantized`` (strategies ``channel``, ``tensor``, ``block``):
  quantized and decompressed by compressed-tensors' own ``FloatQuantizationCompressor``;
* transformers' fine-grained FP8 (``weight_scale_inv`` per 128 × 128 block, DeepSeek-V3's
  layout) and FBGEMM's rowwise FP8 (``weight_scale`` per row): quantized in the test by the
  layout's documentation (scale = block amax / float8 max, q = W / scale in float8,
  W0 = q · scale), e4m3fn and e5m2, with partial edge blocks. The configs are written by
  transformers' ``FineGrainedFP8Config`` / ``FbgemmFp8Config``.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

import ddiscan
from ddiscan.errors import QuantizedBase
from ddiscan.io.quantindex import open_checkpoint
from safetensors_builders import lora_pair, peft_config, rng, save, write_peft_dir

Q = "model.layers.0.self_attn.q_proj"
OUT, IN = 200, 300  # 128-blocks: 2 × 3, the last row and column of blocks partial
FLOAT8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def weight(seed: int = 0) -> np.ndarray:
    return (rng(seed).standard_normal((OUT, IN)) * 0.05).astype(np.float32)


def config_dir(directory: Path, quantization_config: dict) -> Path:
    directory.mkdir(parents=True)
    transformers.LlamaConfig(hidden_size=IN, num_attention_heads=3, num_hidden_layers=1,
                             quantization_config=quantization_config).save_pretrained(directory)
    return directory


def adapter(tmp_path: Path) -> Path:
    a, b = lora_pair(OUT, IN, 4, seed=7)
    prefix = f"base_model.model.{Q}"
    return write_peft_dir(tmp_path / "adapter", {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
                          {**peft_config(4, 8), "target_modules": ["q_proj"]})


def block_quantize(w: np.ndarray, fmt, block=(128, 128)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale_inv, W0) as DeepSeek-V3's ``weight_dequant`` reads them."""
    bo, bi = block
    rows, cols = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
    scale = np.zeros((rows, cols), np.float32)
    full = np.zeros_like(w, dtype=np.float64)
    for r in range(rows):  # the reference may loop: it is the documentation, not the kernel
        for c in range(cols):
            tile = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi]
            scale[r, c] = np.abs(tile).max() / float(ml_dtypes.finfo(fmt).max)
            full[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = scale[r, c]
    q = (w / full).astype(fmt)
    return q, scale, q.astype(np.float64) * full


@pytest.mark.parametrize("fmt", list(FLOAT8))
def test_block_scales_of_transformers_fine_grained_fp8(tmp_path, fmt):
    q, scale_inv, expected = block_quantize(weight(), FLOAT8[fmt])
    base = config_dir(tmp_path / "base", transformers.FineGrainedFP8Config(weight_block_size=(128, 128)).to_dict())
    save(base / "model.safetensors", {f"{Q}.weight": q, f"{Q}.weight_scale_inv": scale_inv,
                                      "model.norm.weight": np.ones(IN, np.float32)})
    index = open_checkpoint(base)
    np.testing.assert_allclose(index.array(f"{Q}.weight"), expected, rtol=1e-6)
    assert index.quantization(f"{Q}.weight") == {"format": "fp8-block", "block_size": [128, 128]}
    reference = save(tmp_path / "ref" / "model.safetensors", {f"{Q}.weight": expected})
    lora = adapter(tmp_path)
    (got,), (want,) = ddiscan.scan(base, lora, exact=True).modules, ddiscan.scan(reference, lora, exact=True).modules
    assert got.ddi == pytest.approx(want.ddi, rel=1e-4) and got.base_norm == pytest.approx(want.base_norm, rel=1e-9)
    assert got.quantization == {"format": "fp8-block", "block_size": [128, 128]}


def test_other_block_sizes_come_from_the_config(tmp_path):
    q, scale_inv, expected = block_quantize(weight(1), FLOAT8["e4m3"], block=(64, 32))
    base = config_dir(tmp_path / "base", transformers.FineGrainedFP8Config(weight_block_size=(64, 32)).to_dict())
    save(base / "model.safetensors", {f"{Q}.weight": q, f"{Q}.weight_scale_inv": scale_inv})
    np.testing.assert_allclose(open_checkpoint(base).array(f"{Q}.weight"), expected, rtol=1e-6)


def test_fbgemm_rowwise_scales(tmp_path):
    w = weight(2)
    scale = (np.abs(w).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
    q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    base = config_dir(tmp_path / "base", transformers.FbgemmFp8Config().to_dict())
    save(base / "model.safetensors", {f"{Q}.weight": q, f"{Q}.weight_scale": scale})
    index = open_checkpoint(base)
    np.testing.assert_allclose(index.array(f"{Q}.weight"), q.astype(np.float64) * scale, rtol=1e-6)
    assert index.quantization(f"{Q}.weight") == {"format": "fp8-channel"}


def ct_config(strategy: str) -> dict:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = [128, 128]
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def ct_scale(w: torch.Tensor, strategy: str) -> torch.Tensor:
    fmax = torch.finfo(torch.float8_e4m3fn).max
    if strategy == "tensor":
        return (w.abs().max() / fmax).reshape(1)
    if strategy == "channel":
        return w.abs().amax(dim=1, keepdim=True) / fmax
    return torch.from_numpy(block_quantize(w.numpy(), FLOAT8["e4m3"])[1])


@pytest.mark.parametrize("strategy, entry", [("channel", {"format": "fp8-channel"}),
                                             ("tensor", {"format": "fp8-tensor"}),
                                             ("block", {"format": "fp8-block", "block_size": [128, 128]})])
def test_compressed_tensors_float_quantized_equals_its_decompression(tmp_path, strategy, entry):
    w = torch.from_numpy(weight(3))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**{
        k: v for k, v in ct_config(strategy)["config_groups"]["group_0"]["weights"].items()}))
    compressed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ct_scale(w, strategy)}, scheme)
    expected = FloatQuantizationCompressor.decompress(compressed, scheme)["weight"].float().numpy()
    base = config_dir(tmp_path / "base", ct_config(strategy))
    save(base / "model.safetensors", {f"{Q}.{k}": v.numpy() if v.dtype != torch.float8_e4m3fn
                                      else v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
                                      for k, v in compressed.items()})
    index = open_checkpoint(base)
    got = index.array(f"{Q}.weight")
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
    assert index.quantization(f"{Q}.weight") == entry


BAD = {
    "block scales of the wrong shape": ({"weight_scale_inv": np.ones((2, 2), np.float32)},
                                        f"{Q}.weight_scale_inv", "expected [2, 3]"),
    "an integer weight": ({"weight": np.zeros((OUT, IN), np.int8)}, f"{Q}.weight", "expected a float8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_inconsistent_scales_are_one_line_errors_naming_the_key(tmp_path, case):
    change, named, expected = BAD[case]
    q, scale_inv, _ = block_quantize(weight(), FLOAT8["e4m3"])
    base = config_dir(tmp_path / "base", transformers.FineGrainedFP8Config().to_dict())
    save(base / "model.safetensors", {f"{Q}.weight": q, f"{Q}.weight_scale_inv": scale_inv,
                                      **{f"{Q}.{k}": v for k, v in change.items()}})
    with pytest.raises(QuantizedBase) as info:
        ddiscan.scan(base, adapter(tmp_path))
    assert named in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)


def test_channel_scales_not_matching_the_rows(tmp_path):
    q = weight().astype(ml_dtypes.float8_e4m3fn)
    base = config_dir(tmp_path / "base", transformers.FbgemmFp8Config().to_dict())
    save(base / "model.safetensors", {f"{Q}.weight": q, f"{Q}.weight_scale": np.ones((OUT - 1, 1), np.float32)})
    with pytest.raises(QuantizedBase, match=rf"{Q}\.weight_scale .*expected \[{OUT}, 1\]"):
        ddiscan.scan(base, adapter(tmp_path))
