"""bitsandbytes-quantized bases are scored against the W0 bitsandbytes itself dequantizes.

Every base is written by the real tools: a tiny LLaMA saved by transformers, loaded with
``BitsAndBytesConfig`` (bitsandbytes runs on CPU) and saved again with ``save_pretrained``
(NF4 and FP4, with and without double quantization, and LLM.int8); block sizes transformers
does not choose are written from bitsandbytes' own ``quantize_4bit`` and
``QuantState.as_dict(packed=True)``, the tensors ``Params4bit`` saves. The references are
bitsandbytes' ``dequantize_4bit`` and ``int8_vectorwise_dequant``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import jsonschema  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import bitsandbytes.functional as bnb_functional  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.errors import QuantizedBase  # noqa: E402
from ddiscan.io.quantindex import QuantizedIndex, open_checkpoint  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"
CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The plain model, each bitsandbytes variant of it, and a PEFT adapter (one DoRA module)."""
    root = tmp_path_factory.mktemp("bnb")
    tiny_llama().save_pretrained(root / "plain")
    paths = {"plain": root / "plain"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, settings in CONFIGS.items():
            model = transformers.LlamaForCausalLM.from_pretrained(
                root / "plain", quantization_config=transformers.BitsAndBytesConfig(**settings), device_map="cpu")
            model.save_pretrained(root / name)
            paths[name] = root / name
        torch.manual_seed(1)
        peft = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "plain"),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         init_lora_weights=False))
        peft.save_pretrained(root / "adapter")
    paths["adapter"] = root / "adapter"
    return paths


def bnb_weight(checkpoint: Path, stem: str) -> np.ndarray:
    """bitsandbytes' own dequantization of ``stem``'s weight in ``checkpoint``."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    weight = tensors[stem + ".weight"]
    if stem + ".SCB" in tensors:
        return bnb_functional.int8_vectorwise_dequant(weight, tensors[stem + ".SCB"]).numpy()
    prefix = stem + ".weight."
    state = bnb_functional.QuantState.from_dict(
        {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, device="cpu")
    return bnb_functional.dequantize_4bit(weight, state).numpy()


def quantized_stems(checkpoint: Path) -> list[str]:
    index = open_checkpoint(checkpoint)
    assert isinstance(index, QuantizedIndex)
    return sorted(key.removesuffix(".weight") for key in index.quantized)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_dequantized_weights_equal_bitsandbytes(models, variant):
    index = open_checkpoint(models[variant])
    stems = quantized_stems(models[variant])
    assert len(stems) == 14  # 7 Linear layers a block, 2 blocks; lm_head and embeddings stay plain
    for stem in stems:
        expected = bnb_weight(models[variant], stem)
        got = index.array(stem + ".weight")
        assert got.dtype == np.float32 and got.shape == expected.shape == index.info(stem + ".weight").shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
    # the stored tensors are hidden behind the weight they make; the plain ones read as they are
    assert not any(".absmax" in key or key.endswith(".SCB") for key in index.keys())
    assert index.info("lm_head.weight").dtype == "F32" and "lm_head.weight" not in index.quantized


def plain_base(models, variant: str, directory: Path) -> Path:
    """The checkpoint of ``variant`` with each quantized weight replaced by bitsandbytes'
    dequantization of it, in float32: the reference base."""
    tensors = load_file(str(models[variant] / "model.safetensors"))
    plain = {k: v for k, v in load_file(str(models["plain"] / "model.safetensors")).items()
             if not any(k.startswith(s + ".") for s in quantized_stems(models[variant]))}
    for stem in quantized_stems(models[variant]):
        plain[stem + ".weight"] = torch.from_numpy(bnb_weight(models[variant], stem))
    assert set(plain) <= set(tensors) | set(load_file(str(models["plain"] / "model.safetensors")))
    directory.mkdir()
    save_file(plain, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_exact_scan_equals_the_float64_reference_of_bitsandbytes_w0(models, variant, tmp_path):
    plain = plain_base(models, variant, tmp_path / "ref")
    reference = ddiscan.scan(plain, models["adapter"], exact=True)
    report = ddiscan.scan(models[variant], models["adapter"], exact=True)
    assert [m.name for m in report.modules] == [m.name for m in reference.modules] and len(report.modules) == 6
    for got, want in zip(report.modules, reference.modules):
        assert got.ddi == pytest.approx(want.ddi, rel=1e-4)
        assert got.base_norm == pytest.approx(want.base_norm, rel=1e-6)
    # the sketched scan sees the same W0 as the sketched scan of the reference
    fast = ddiscan.scan(models[variant], models["adapter"])
    for got, want in zip(fast.modules, ddiscan.scan(plain, models["adapter"]).modules):
        assert got.ddi == pytest.approx(want.ddi, rel=1e-4)


@pytest.mark.parametrize("variant, entry", [
    ("nf4-dq", {"format": "bnb-nf4", "block_size": 64, "double_quant": True}),
    ("nf4", {"format": "bnb-nf4", "block_size": 64, "double_quant": False}),
    ("fp4", {"format": "bnb-fp4", "block_size": 64, "double_quant": False}),
    ("int8", {"format": "bnb-int8"}),
])
def test_each_row_says_how_its_w0_was_dequantized(models, variant, entry):
    report = ddiscan.scan(models[variant], models["adapter"])
    assert all(m.quantization == entry for m in report.modules)
    data = report.to_dict()
    jsonschema.validate(data, ddiscan.load_schema())
    assert data["modules"][0]["quantization"] == entry
    assert data["inputs"]["base"]["quantization"].startswith("bitsandbytes")
    assert all(m.quantization is None for m in ddiscan.scan(models["plain"], models["adapter"]).modules)


def write_4bit(directory: Path, weight: torch.Tensor, *, blocksize: int, quant_type: str, nested: bool) -> Path:
    """A one-weight checkpoint in the layout Params4bit saves, from bitsandbytes' quantizer."""
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    tensors = {f"{Q}.weight": packed}
    tensors.update({f"{Q}.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested}
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                      quantization_config=transformers.BitsAndBytesConfig(**settings).to_dict())
    config.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_any_block_size_and_a_partial_last_block(tmp_path, blocksize, quant_type, nested):
    weight = torch.randn(24, 1000, generator=torch.Generator().manual_seed(blocksize))  # 24000: blocks end partial
    base = write_4bit(tmp_path / "base", weight, blocksize=blocksize, quant_type=quant_type, nested=nested)
    expected = bnb_weight(base, Q)
    index = open_checkpoint(base)
    np.testing.assert_allclose(index.array(f"{Q}.weight"), expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
    assert index.quantization(f"{Q}.weight") == {"format": f"bnb-{quant_type}", "block_size": blocksize,
                                                 "double_quant": nested}


@pytest.mark.parametrize("shape", [(5, 9), (6, 7), (3, 2)])  # an odd count of codes, of bytes, one byte
def test_odd_sizes_decode_every_code(tmp_path, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    base = write_4bit(tmp_path / "base", weight, blocksize=64, quant_type="nf4", nested=False)
    np.testing.assert_allclose(open_checkpoint(base).array(f"{Q}.weight"), bnb_weight(base, Q), rtol=1e-6)


def test_check_many_adapters_and_profile_of_a_quantized_base(models, tmp_path):
    base = models["nf4-dq"]
    one, two = ddiscan.scan_many(base, [models["adapter"], models["adapter"]])
    single = ddiscan.scan(base, models["adapter"])
    assert [m.ddi for m in one.modules] == [m.ddi for m in two.modules] == [m.ddi for m in single.modules]
    ddiscan.build_profile(base, tmp_path / "nf4.ddiprofile", exact=True)
    from_profile = ddiscan.scan(tmp_path / "nf4.ddiprofile", models["adapter"])
    for got, want in zip(from_profile.modules, ddiscan.scan(base, models["adapter"], exact=True).modules):
        assert got.ddi == pytest.approx(want.ddi, rel=1e-6)
        assert got.quantization == want.quantization == {"format": "bnb-nf4", "block_size": 64, "double_quant": True}
    jsonschema.validate(from_profile.to_dict(), ddiscan.load_schema())
    from click.testing import CliRunner
    from ddiscan.cli import cli
    result = CliRunner().invoke(cli, ["check", str(models["adapter"]), "--base", str(base), "--max-ddi", "1e9"])
    assert result.exit_code == 0, result.output


def test_pruned_qlora_adapter_loads_in_peft_on_the_bnb_4bit_model(models, tmp_path):
    result = ddiscan.prune(models["nf4-dq"], models["adapter"], tmp_path / "pruned", top=2)
    assert len(result.selection.names) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(
            models["nf4-dq"], device_map="cpu")  # the pre-quantized checkpoint, as QLoRA users load it
        peft = PeftModel.from_pretrained(model, tmp_path / "pruned")
    assert "Linear4bit" in type(peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    state = peft.state_dict()
    pruned = set(result.selection.names)
    for name in pruned:
        b = next(v for k, v in state.items() if name.removeprefix("base_model.model.") in k and "lora_B" in k)
        assert float(b.abs().max()) == 0.0


def corrupt(base: Path, directory: Path, edit) -> Path:
    tensors = load_file(str(base / "model.safetensors"))
    edit(tensors)
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text((base / "config.json").read_text())
    return directory


def _blob(tensors: dict, **change) -> None:
    key = f"{Q}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].numpy()))
    state.update(change)
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


BAD = {
    "absmax of the wrong length": (lambda t: t.update({f"{Q}.weight.absmax": t[f"{Q}.weight.absmax"][:-1]}),
                                   f"{Q}.weight.absmax", "expected 64"),
    "quant_state naming another shape": (lambda t: _blob(t, shape=[64, 32]), f"{Q}.weight", "expected 1024"),
    "quant_state of another quant_type": (lambda t: _blob(t, quant_type="af4"), "quant_state", "expected 'nf4'"),
    "no absmax": (lambda t: t.pop(f"{Q}.weight.absmax"), f"{Q}.weight.absmax", "missing"),
    "a quant_state that is not JSON": (
        lambda t: t.update({f"{Q}.weight.quant_state.bitsandbytes__nf4": torch.zeros(5, dtype=torch.uint8)}),
        "quant_state", "not valid JSON"),
    "nested_absmax of the wrong length": (
        lambda t: t.update({f"{Q}.weight.nested_absmax": torch.ones(3)}), f"{Q}.weight.nested_absmax", "expected 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_inconsistent_companions_are_one_line_errors_naming_the_key(models, tmp_path, case):
    edit, named, expected = BAD[case]
    base = corrupt(models["nf4-dq"], tmp_path / "bad", edit)
    with pytest.raises(QuantizedBase) as info:
        ddiscan.scan(base, models["adapter"])
    message = str(info.value)
    assert named in message and expected in message and "\n" not in message


def test_scb_of_the_wrong_length_is_refused(models, tmp_path):
    base = corrupt(models["int8"], tmp_path / "bad", lambda t: t.update({f"{Q}.SCB": t[f"{Q}.SCB"][:5]}))
    with pytest.raises(QuantizedBase, match=rf"{Q}\.SCB .*expected 64 \(one scale per row"):
        ddiscan.scan(base, models["adapter"])


def test_an_unsloth_adapter_finds_its_pre_quantized_base_in_the_hf_cache(models, tmp_path, monkeypatch):
    from test_locate import HF_VARS, add_snapshot

    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = "unsloth/tiny-llama-bnb-4bit"
    files = {name: (models["nf4-dq"] / name).read_bytes() for name in ("config.json", "model.safetensors")}
    snapshot = add_snapshot(tmp_path / "hf" / "hub", "1" * 40, files, repo=repo)
    unsloth = tmp_path / "unsloth-adapter"
    unsloth.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (unsloth / name).write_bytes((models["adapter"] / name).read_bytes())
    config = json.loads((unsloth / "adapter_config.json").read_text())
    (unsloth / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": repo}))
    found = ddiscan.find_base(unsloth)
    assert found.path == snapshot and found.source == "hf-cache"
    report = ddiscan.scan(found, unsloth)
    assert [m.ddi for m in report.modules] == [m.ddi for m in ddiscan.scan(models["nf4-dq"], unsloth).modules]
    assert report.modules[0].quantization["format"] == "bnb-nf4"


def test_dora_reset_and_project_rewrite_use_the_dequantized_w0(models, tmp_path):
    from safetensors.numpy import load_file as load_numpy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        dora = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(models["plain"]),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                         init_lora_weights=False))
        dora.save_pretrained(tmp_path / "dora")
    ddiscan.prune(models["nf4-dq"], tmp_path / "dora", tmp_path / "reset", top=2, mode="zero")
    pruned = load_numpy(str(tmp_path / "reset" / "adapter_model.safetensors"))
    magnitude = f"base_model.model.{Q}.lora_magnitude_vector.weight"
    if magnitude not in pruned:
        magnitude = next(k for k in pruned if "lora_magnitude_vector" in k and Q in k)
    # DoRA is a no-op when its magnitude is W0's row norms: W0 as bitsandbytes dequantizes it
    expected = np.linalg.norm(bnb_weight(models["nf4-dq"], Q).astype(np.float64), axis=1)
    np.testing.assert_allclose(pruned[magnitude], expected, rtol=1e-5)

    unaligned = tmp_path / "unaligned"
    tensors = load_file(str(models["plain"] / "model.safetensors"))
    tensors = {k: v - 0.01 * torch.ones_like(v) if "q_proj" in k else v for k, v in tensors.items()}
    unaligned.mkdir()
    save_file(tensors, str(unaligned / "model.safetensors"))
    options = dict(top=2, mode="project", method="safelora", aligned=models["plain"], unaligned=unaligned)
    ddiscan.prune(models["nf4-dq"], models["adapter"], tmp_path / "projected", **options)
    ddiscan.prune(plain_base(models, "nf4-dq", tmp_path / "ref"), models["adapter"], tmp_path / "reference", **options)
    got = load_numpy(str(tmp_path / "projected" / "adapter_model.safetensors"))
    want = load_numpy(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
