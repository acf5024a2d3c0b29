"""ddiscan.io.mlxquant against MLX's own ``mx.quantize`` / ``mx.dequantize``, and on a tiny
model quantized and saved by mlx-lm's own ``quantize_model`` / ``save_model`` / ``save_config``
(with a per-layer override, which mlx-lm writes into config.json's ``"quantization"``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddiscan.errors import QuantizedBase
from ddiscan.io import mlxquant
from ddiscan.io.reader import SafetensorsFile

mx = pytest.importorskip("mlx.core")


@pytest.mark.parametrize("bits", mlxquant.BITS)
@pytest.mark.parametrize("group_size", mlxquant.GROUP_SIZES)
def test_equals_mx_dequantize(bits, group_size):
    w = np.random.default_rng(bits * group_size).standard_normal((16, 256)).astype(np.float32)
    q, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    expected = np.array(mx.dequantize(q, scales, biases, group_size=group_size, bits=bits))
    arrays = {"weight": np.array(q), "scales": np.array(scales), "biases": np.array(biases)}
    got = mlxquant.mlx_dequantize(arrays, meta={"bits": bits, "group_size": group_size}, dtype=np.float64)
    assert got.shape == (16, 256) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_float16_scales():
    w = mx.array(np.random.default_rng(0).standard_normal((8, 128)).astype(np.float16))
    q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    expected = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=4).astype(mx.float32))
    arrays = {"weight": np.array(q), "scales": np.array(scales), "biases": np.array(biases)}
    assert arrays["scales"].dtype == np.float16
    got = mlxquant.mlx_dequantize(arrays, meta={"bits": 4, "group_size": 64}, dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)  # MLX rounds its result to float16


@pytest.fixture(scope="module")
def mlx_lm_model(tmp_path_factory):
    """A one-layer Llama written by transformers, quantized (4 bits, groups of 32; down_proj 8
    bits in groups of 64) and saved by mlx-lm."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    utils = pytest.importorskip("mlx_lm.utils")
    hf, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("mlx")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    model, config = utils.load_model(hf)
    def override(path, module):
        return {"group_size": 64, "bits": 8} if path.endswith("down_proj") else True
    model, config = utils.quantize_model(model, config, 32, 4, quant_predicate=override)
    utils.save_model(str(out), model)
    utils.save_config(config, str(out / "config.json"))
    return out


def test_mlx_lm_saved_model(mlx_lm_model):
    quantization = json.loads((mlx_lm_model / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 8}
    file = SafetensorsFile(mlx_lm_model / "model.safetensors", record=False)
    stored = mx.load(str(mlx_lm_model / "model.safetensors"))
    keys = set(file.keys())
    stems = sorted(k.removesuffix(".scales") for k in keys if k.endswith(".scales"))
    assert "model.layers.0.self_attn.q_proj" in stems and "model.layers.0.mlp.down_proj" in stems
    for stem in stems:
        parts = mlxquant.MLX_AFFINE.parts(stem, keys)
        meta = mlxquant.layer_meta(quantization, stem)
        got = mlxquant.MLX_AFFINE.dequantize({r: file.array(k) for r, k in parts.items()}, meta=meta,
                                             dtype=np.float64)
        expected = np.array(mx.dequantize(stored[f"{stem}.weight"], stored[f"{stem}.scales"],
                                          stored[f"{stem}.biases"], group_size=meta["group_size"],
                                          bits=meta["bits"]))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=stem)
    assert mlxquant.MLX_AFFINE.parts("model.layers.0.input_layernorm", keys) is None


def test_layer_meta():
    quantization = {"group_size": 64, "bits": 4, "mode": "affine", "a.b": {"group_size": 32, "bits": 8}, "c": False}
    assert mlxquant.layer_meta(quantization, "a.b") == {"group_size": 32, "bits": 8}
    assert mlxquant.layer_meta(quantization, "c") is None
    assert mlxquant.layer_meta(quantization, "d") == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert mlxquant.MLX_AFFINE.describe({"group_size": 64, "bits": 4}) == {
        "format": "mlx-affine", "bits": 4, "group_size": 64}


def _arrays(bits=4, group_size=64):
    q, scales, biases = mx.quantize(mx.array(np.ones((8, 128), np.float32)), group_size=group_size, bits=bits)
    return {"weight": np.array(q), "scales": np.array(scales), "biases": np.array(biases)}


@pytest.mark.parametrize("change, meta, match", [
    ({"scales": np.ones((8, 1), np.float32)}, {}, r"scales: has shape \[8, 1\]; expected \[8, 2\]"),
    ({"biases": np.ones((4, 2), np.float32)}, {}, r"biases: has shape \[4, 2\]; expected \[8, 2\]"),
    ({"weight": np.ones((8, 16), np.float32)}, {}, r"weight: has dtype float32"),
    ({}, {"bits": 7}, r"quantization_config bits: 7"),
    ({}, {"mode": "mxfp4"}, r"mode: 'mxfp4'"),
    ({}, {"group_size": 128, "bits": 3}, r"weight: 16 words a row do not hold whole groups of 128 3-bit values"),
])
def test_bad_companions(change, meta, match):
    arrays = {**_arrays(), **change}
    with pytest.raises(QuantizedBase, match=match) as info:
        mlxquant.mlx_dequantize(arrays, meta={"bits": 4, "group_size": 64, **meta}, dtype=np.float32)
    assert "\n" not in str(info.value)


def test_missing_biases():
    with pytest.raises(QuantizedBase, match=r"m\.biases: missing"):
        mlxquant.MLX_AFFINE.parts("m", {"m.weight", "m.scales"})
