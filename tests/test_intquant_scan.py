"""End to end: ``ddiscan.scan`` on a GPTQ, AWQ, compressed-tensors or MLX-quantized
safetensors base equals the exact scan on the same weights dequantized by the independent
references of tests/test_intquant.py / tests/test_mlxquant.py and stored as float64.

These run once the quantized-base framework (``ddiscan/sources/quantized.py``, issue 17's
other half) is merged; until then the module is skipped as a whole.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ddiscan.sources.quantized")  # the framework that wires the schemes in

import ddiscan  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from test_intquant import awq_case, ct_case, gptq_case  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny Llama's state (float32 numpy) and a PEFT adapter of its q/v projections."""
    tmp = tmp_path_factory.mktemp("intquant-scan")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    state = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(tmp / "adapter")
    return tmp, tmp / "adapter", state, config.to_dict()


def _write(directory, tensors: dict, config: dict):
    directory.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


def _quantized_pair(plain, name, quantize, quantization):
    """Quantized base (``quantize(stem) -> (tensors, reference W)`` for each target) and the
    float64 reference base."""
    tmp, adapter, state, config = plain
    quantized, reference = dict(state), dict(state)
    for key in [k for k in state if k.endswith(tuple(f"{t}.weight" for t in TARGETS))]:
        stem = key.removesuffix(".weight")
        del quantized[key]
        tensors, w = quantize(stem)
        quantized.update({f"{stem}.{role}": v for role, v in tensors.items()})
        reference[key] = w.astype(np.float64)
    _write(tmp / f"{name}-q", quantized, {**config, **quantization})
    _write(tmp / f"{name}-ref", reference, config)
    return tmp / f"{name}-q", tmp / f"{name}-ref", adapter


def _assert_same_scan(base, reference, adapter):
    expected = {m.name: m.ddi for m in ddiscan.scan(reference, adapter, exact=True).modules}
    got = {m.name: m.ddi for m in ddiscan.scan(base, adapter, exact=True).modules}
    assert got.keys() == expected.keys() and len(got) == 2
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4), name


def test_gptq_base(plain):
    def quantize(stem):
        arrays, _, w = gptq_case(np.random.default_rng(len(stem)), n_in=64, n_out=64, group=16, act_order=True)
        return arrays, w
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                                      "sym": False, "checkpoint_format": "gptq"}}
    _assert_same_scan(*_quantized_pair(plain, "gptq", quantize, config))


def test_awq_base(plain):
    def quantize(stem):
        arrays, _, w = awq_case(np.random.default_rng(len(stem)), n_in=64, n_out=64, group=16)
        return arrays, w
    config = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm",
                                      "zero_point": True}}
    _assert_same_scan(*_quantized_pair(plain, "awq", quantize, config))


def test_compressed_tensors_base(plain):
    def quantize(stem):
        arrays, _, w = ct_case(4, False, "group", n_out=64, n_in=64, group=16, seed=len(stem))
        return arrays, w
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16}}},
        "ignore": ["lm_head"]}}
    _assert_same_scan(*_quantized_pair(plain, "ct", quantize, config))


def test_mlx_base(plain):
    mx = pytest.importorskip("mlx.core")
    _, _, state, _ = plain

    def quantize(stem):
        q, scales, biases = mx.quantize(mx.array(state[f"{stem}.weight"]), group_size=32, bits=4)
        w = np.array(mx.dequantize(q, scales, biases, group_size=32, bits=4))
        return {"weight": np.array(q), "scales": np.array(scales), "biases": np.array(biases)}, w
    quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    config = {"quantization": quantization, "quantization_config": quantization}  # as mlx-lm writes both
    _assert_same_scan(*_quantized_pair(plain, "mlx", quantize, config))
