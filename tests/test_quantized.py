"""Quantized bases that ddiscan does not decode are refused, naming the scheme, never scored
as if they held W0 (the schemes it decodes: tests/test_bnb.py, tests/test_fp8.py).

The ``config.json`` of each base is written by transformers itself (``LlamaConfig`` with the
``quantization_config`` of its own ``GPTQConfig``, ``AwqConfig``, ``BitsAndBytesConfig``,
``FineGrainedFP8Config``, ``FbgemmFp8Config``), and the base tensors are named as each scheme
stores them:

* GPTQ / AWQ (AutoGPTQ's and AutoAWQ's ``QuantLinear``): ``qweight``, ``qzeros``, ``scales``
  (and ``g_idx`` for GPTQ) in place of ``weight``;
* bitsandbytes 4-bit (``Params4bit``): a packed ``uint8`` ``weight`` with ``weight.absmax``,
  ``weight.quant_map`` and ``weight.quant_state.bitsandbytes__nf4``; 8-bit (``Int8Params``):
  an ``int8`` ``weight`` with ``SCB``;
* transformers' fine-grained FP8: an ``float8_e4m3fn`` ``weight`` with ``weight_scale_inv``;
  fbgemm FP8: with ``weight_scale``;
* compressed-tensors ``pack-quantized`` (``PackedQuantizationCompressor``): ``weight_packed``,
  ``weight_scale``, ``weight_shape``. Its config class needs the compressed-tensors package,
  so that config is written as the package writes it (``quant_method``, ``format``,
  ``config_groups``, ``quantization_status``);
* Mistral's native format (``consolidated.safetensors``, vLLM's ``mistral_mapping``):
  ``layers.N.attention.wq.weight`` in float8 with ``qscale_weight`` and ``qscale_act``
  beside it, and no config.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import transformers

import ddiscan
from ddiscan.errors import InputError, QuantizedBase
from ddiscan.io.index import TensorIndex
from safetensors_builders import (
    HIDDEN, llama_base_tensors, llama_peft_tensors, peft_config, rng, save, write_index, write_peft_dir,
)

Q = "model.layers.0.self_attn.q_proj"


def write_config(directory: Path, quantization_config: dict | None) -> Path:
    """config.json as transformers writes it for a one-layer LLaMA."""
    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=2 * HIDDEN, num_hidden_layers=1, vocab_size=32, **extra)
    config.save_pretrained(directory)
    return directory / "config.json"


def fp8(shape, seed=0) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(ml_dtypes.float8_e4m3fn)


def replace_q(tensors: dict, new: dict) -> dict:
    """The base with q_proj's weight replaced by the scheme's tensors."""
    out = {k: v for k, v in tensors.items() if k != f"{Q}.weight"}
    out.update({f"{Q}.{name}": value for name, value in new.items()})
    return out


I32 = np.int32
SCHEMES = {
    "gptq": (lambda: transformers.GPTQConfig(bits=4, group_size=8).to_dict(), "gptq", {
        "qweight": np.zeros((HIDDEN // 8, HIDDEN), I32), "qzeros": np.zeros((2, HIDDEN // 8), I32),
        "scales": np.ones((2, HIDDEN), np.float16), "g_idx": np.zeros(HIDDEN, I32)}),
    "awq": (lambda: transformers.AwqConfig(bits=4, group_size=8).to_dict(), "awq", {
        "qweight": np.zeros((HIDDEN, HIDDEN // 8), I32), "qzeros": np.zeros((2, HIDDEN // 8), I32),
        "scales": np.ones((2, HIDDEN), np.float16)}),
    "eetq": (lambda: transformers.EetqConfig().to_dict(), "eetq", {
        "weight": np.zeros((HIDDEN, HIDDEN), np.int8), "weight_scales": np.ones(HIDDEN, np.float16)}),
    "quanto": (lambda: transformers.QuantoConfig(weights="int8").to_dict(), "quanto", {
        "weight._data": np.zeros((HIDDEN, HIDDEN), np.int8), "weight._scale": np.ones((HIDDEN, 1), np.float32)}),
    "compressed-tensors": (lambda: {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8}}},
        "ignore": ["lm_head"]}, "compressed-tensors", {
        "weight_packed": np.zeros((HIDDEN, HIDDEN // 8), I32), "weight_scale": np.ones((HIDDEN, 2), np.float16),
        "weight_shape": np.array([HIDDEN, HIDDEN], np.int64)}),
}


def quantized_pair(tmp_path: Path, scheme: str, *, config: bool = True) -> tuple[Path, Path]:
    make_config, _, tensors = SCHEMES[scheme]
    base_dir = tmp_path / "base"
    save(base_dir / "model.safetensors", replace_q(llama_base_tensors(1), tensors))
    if config:
        write_config(base_dir, make_config())
    adapter = write_peft_dir(tmp_path / "adapter", llama_peft_tensors(1, 4), peft_config(4, 8))
    return base_dir, adapter


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddiscan.cli", *map(str, args)], capture_output=True, text=True)


# GPTQ, AWQ and compressed-tensors pack-quantized are read (tests/test_intquant_scan.py); their
# entries here are the packed tensors a base without config.json is refused for
@pytest.mark.parametrize("scheme", ["eetq", "quanto"])
def test_config_quantization_refused_naming_the_scheme(tmp_path, scheme):
    base_dir, adapter = quantized_pair(tmp_path, scheme)
    name = SCHEMES[scheme][1]
    for given in (base_dir, base_dir / "model.safetensors"):
        with pytest.raises(QuantizedBase) as info:
            ddiscan.scan(given, adapter)
        message = str(info.value)
        assert f"quantized with {name} (" in message and str(base_dir / "config.json") in message
        assert "a scheme ddiscan does not decode" in message and "\n" not in message
    result = run_cli("report", base_dir, adapter)
    assert result.returncode == 3 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and f"quantized with {name}" in line and "Traceback" not in result.stderr


def test_sharded_base_with_quantization_config_refused(tmp_path):
    index = write_index(tmp_path / "base", {"model-00001-of-00001.safetensors": llama_base_tensors(1)})
    write_config(index.parent, transformers.GPTQConfig(bits=4).to_dict())
    for given in (index, index.parent):
        with pytest.raises(QuantizedBase, match=r"quantized with gptq"):
            TensorIndex(given)


@pytest.mark.parametrize("scheme, named", [("gptq", "qweight"), ("awq", "qweight"),
                                           ("compressed-tensors", "weight_packed")])
def test_packed_weights_without_config_say_quantized_not_unmatched(tmp_path, scheme, named):
    base_dir, adapter = quantized_pair(tmp_path, scheme, config=False)
    with pytest.raises(QuantizedBase) as info:
        ddiscan.scan(base_dir, adapter)
    assert f"{Q}.{named} is a packed quantized weight" in str(info.value)
    assert "match no base weight" not in str(info.value)


# quantized tensors as each scheme stores them, with no config.json to say so
BESIDE = {
    "bnb-4bit": {"weight": np.zeros((HIDDEN * HIDDEN // 2, 1), np.uint8), "weight.absmax": np.ones(4, np.float32),
                 "weight.quant_map": np.ones(16, np.float32),
                 "weight.quant_state.bitsandbytes__nf4": np.zeros(8, np.uint8)},
    "bnb-8bit": {"weight": np.zeros((HIDDEN, HIDDEN), np.int8), "SCB": np.ones(HIDDEN, np.float32)},
    "fp8": {"weight": fp8((HIDDEN, HIDDEN)), "weight_scale_inv": np.ones((2, 2), np.float32)},
    "fbgemm_fp8": {"weight": fp8((HIDDEN, HIDDEN)), "weight_scale": np.ones((HIDDEN, 1), np.float32)},
}


@pytest.mark.parametrize("scheme", list(BESIDE))
def test_without_config_the_tensors_beside_the_weight_still_refuse(tmp_path, scheme):
    save(tmp_path / "base" / "model.safetensors", replace_q(llama_base_tensors(1), BESIDE[scheme]))
    adapter = write_peft_dir(tmp_path / "adapter", llama_peft_tensors(1, 4), peft_config(4, 8))
    with pytest.raises(QuantizedBase) as info:
        ddiscan.scan(tmp_path / "base", adapter)
    assert f"{Q}.weight" in str(info.value)


def mistral_fp8_base(directory: Path) -> Path:
    """consolidated.safetensors of a Mistral FP8 checkpoint: wq in float8 with its scales."""
    g = rng(3)
    w = g.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    scale = np.float32(np.abs(w).max() / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max))
    tensors = {
        "tok_embeddings.weight": g.standard_normal((32, HIDDEN)).astype(np.float32),
        "layers.0.attention.wq.weight": (w / scale).astype(ml_dtypes.float8_e4m3fn),
        "layers.0.attention.wq.qscale_weight": np.array(scale, np.float32),
        "layers.0.attention.wq.qscale_act": np.array(1.0, np.float32),
        "layers.0.attention_norm.weight": np.ones(HIDDEN, np.float32),
    }
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(
        {"dim": HIDDEN, "n_layers": 1, "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}}))
    return save(directory / "consolidated.safetensors", tensors)


def test_mistral_fp8_with_qscale_weight_is_refused_not_scored(tmp_path):
    base = mistral_fp8_base(tmp_path / "mistral")
    a, b = rng(4).standard_normal((4, HIDDEN)), rng(5).standard_normal((HIDDEN, 4))
    adapter = write_peft_dir(tmp_path / "adapter", {
        "base_model.model.layers.0.attention.wq.lora_A.weight": a.astype(np.float32),
        "base_model.model.layers.0.attention.wq.lora_B.weight": b.astype(np.float32),
    }, {**peft_config(4, 8), "target_modules": ["wq"]})
    with pytest.raises(QuantizedBase) as info:
        ddiscan.scan(base, adapter)
    message = str(info.value)
    assert "layers.0.attention.wq.weight" in message and "layers.0.attention.wq.qscale" in message
    assert "F8_E4M3" in message
    result = run_cli("check", adapter, "--base", base, "--max-ddi", "1")
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1 and "qscale" in result.stderr


def test_bare_float8_weight_with_bias_is_still_scored(tmp_path):
    # W0 cast to float8 with nothing beside it but a bias is W0 (at float8 precision)
    tensors = llama_base_tensors(1)
    w = tensors[f"{Q}.weight"]
    tensors[f"{Q}.weight"] = w.astype(ml_dtypes.float8_e4m3fn)
    tensors[f"{Q}.bias"] = np.zeros(HIDDEN, np.float32)
    base = save(tmp_path / "base" / "model.safetensors", tensors)
    adapter = write_peft_dir(tmp_path / "adapter", llama_peft_tensors(1, 4, projs=("q_proj",)), peft_config(4, 8))
    (module,) = ddiscan.scan(base, adapter).modules
    expected = float(np.linalg.norm(w.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)))
    assert module.base_norm == pytest.approx(expected, rel=1e-6)


def test_unquantized_configs_are_not_refused(tmp_path):
    base, adapter = quantized_pair(tmp_path, "gptq", config=False)
    save(base / "model.safetensors", llama_base_tensors(1))
    for quantization_config in (None, transformers.BitsAndBytesConfig().to_dict()):
        write_config(base, quantization_config)
        assert len(ddiscan.scan(base, adapter).modules) == 4


def test_unreadable_config_json_is_an_input_error(tmp_path):
    base, adapter = quantized_pair(tmp_path, "gptq", config=False)
    save(base / "model.safetensors", llama_base_tensors(1))
    (base / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config\.json: not valid JSON .*quantization_config"):
        TensorIndex(base)
