"""GGUF bases end to end: a tiny Hugging Face Llama written as GGUF by the gguf package's own
GGUFWriter and quantizers (``gguf.quants.quantize``), with q/k rows permuted as llama.cpp's
``convert_hf_to_gguf.py`` does (``LlamaModel.permute``, copied below), scored against a PEFT
adapter trained on it.

The reference is the same file read back by gguf's own ``GGUFReader`` and dequantized by
``gguf.quants.dequantize``, rows un-permuted by an independent inverse (``np.argsort`` of the
converter's permutation), saved as a float32 safetensors checkpoint (lossless: gguf dequantizes
to float32): the report on the GGUF base must equal the report on that checkpoint, both
``exact``, to 1e-4 relative.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import ddiscan
from ddiscan.errors import InputError, QuantizedBase
from ddiscan.io import ggufnames

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

N_HEAD, N_HEAD_KV, HIDDEN, FFN, VOCAB = 4, 2, 256, 512, 256
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def converter_permute(weights, n_head: int, n_head_kv: int | None):
    """convert_hf_to_gguf.py ``LlamaModel.permute`` (ggml-org/llama.cpp), as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=2, num_attention_heads=N_HEAD,
                                      num_key_value_heads=N_HEAD_KV, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def gguf_names(model):
    """HF key -> GGUF name, the way the converter names them (gguf's own TensorNameMap)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    out = {}
    for key in model.state_dict():
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[key] = name
    return out


# K-quant block layouts (ggml-common.h block_q4_K / block_q5_K / block_q6_K): bytes per
# 256-value block, and the byte offsets of its float16 super-block scales (d, dmin)
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def k_quant_blocks(shape, kind, seed=0):
    """gguf's Python has no K-quant quantizer (``quantize`` raises NotImplementedError): K-quant
    rows are random blocks, their float16 scales set to small finite values; the reference and
    ddiscan both read them through gguf's own dequantizer."""
    size, scales = K_BLOCKS[kind.name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (shape[0], shape[1] // 256, size), dtype=np.uint8)
    for offset in scales:
        d = rng.uniform(1e-4, 1e-3, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(shape[0], -1)


def write_gguf(path, model, qtype, arch="llama", permute=True):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_embedding_length(HIDDEN)
    for key, name in gguf_names(model).items():
        data = model.state_dict()[key].float().numpy()
        if permute and key.endswith("q_proj.weight"):
            data = converter_permute(data, N_HEAD, N_HEAD)
        if permute and key.endswith("k_proj.weight"):
            data = converter_permute(data, N_HEAD, N_HEAD_KV)
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        stored = k_quant_blocks(data.shape, kind) if kind.name.endswith("_K") else gguf.quants.quantize(data, kind)
        writer.add_tensor(name, stored, raw_shape=stored.shape if kind in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_checkpoint(gguf_path, out_path, model):
    """The GGUF read back by gguf itself, dequantized and un-permuted, as float32 safetensors."""
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    tensors = {}
    for key, name in gguf_names(model).items():
        t = by_name[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape.tolist())])
        heads = N_HEAD if "q_proj" in key else N_HEAD_KV if "k_proj" in key else None
        if heads is not None and w.ndim == 2:
            order = converter_permute(np.arange(w.shape[0]), N_HEAD, heads)
            w = w[np.argsort(order)]
        tensors[key] = w.astype(np.float32)
    from safetensors.numpy import save_file
    save_file(tensors, str(out_path))


@pytest.fixture(scope="module")
def adapter_and_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                             init_lora_weights=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft.get_peft_model(model, config).save_pretrained(tmp / "adapter")
    fresh = tiny_llama()
    fresh.load_state_dict(original)
    return tmp, tmp / "adapter", fresh


def _ddi(report):
    return {m.name: m.ddi for m in report.modules}


TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", TYPES)
def test_report_on_gguf_equals_dequantized_reference(adapter_and_model, type_name):
    tmp, adapter, model = adapter_and_model
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name.endswith("_K"):
        pytest.importorskip("gguf.quants")
    path = tmp / f"model-{type_name}.gguf"
    try:
        write_gguf(path, model, qtype)
    except NotImplementedError:
        pytest.fail(f"gguf cannot quantize {type_name}")
    reference = tmp / f"ref-{type_name}.safetensors"
    reference_checkpoint(path, reference, model)
    got = ddiscan.scan(str(path), adapter, exact=True)
    expected = ddiscan.scan(reference, adapter, exact=True)
    assert len(got.modules) == 10
    for name, value in _ddi(expected).items():
        assert _ddi(got)[name] == pytest.approx(value, rel=1e-4), name


def test_f32_gguf_equals_the_hf_base(adapter_and_model):
    """Un-permuting matters: an F32 GGUF scores as the original Hugging Face weights, and a
    file written without the converter's permutation (read as if permuted) does not."""
    tmp, adapter, model = adapter_and_model
    model.save_pretrained(tmp / "hf")
    write_gguf(tmp / "f32.gguf", model, gguf.GGMLQuantizationType.F32)
    write_gguf(tmp / "unpermuted.gguf", model, gguf.GGMLQuantizationType.F32, permute=False)
    expected = _ddi(ddiscan.scan(tmp / "hf", adapter, exact=True))
    got = _ddi(ddiscan.scan(str(tmp / "f32.gguf"), adapter, exact=True))
    wrong = _ddi(ddiscan.scan(str(tmp / "unpermuted.gguf"), adapter, exact=True))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
    assert any(wrong[n] != pytest.approx(v, rel=1e-3) for n, v in expected.items() if "q_proj" in n)


def test_cli_report_on_gguf(adapter_and_model, tmp_path):
    from click.testing import CliRunner
    from ddiscan.cli import cli

    _, adapter, model = adapter_and_model
    write_gguf(tmp_path / "m.gguf", model, gguf.GGMLQuantizationType.Q4_K)
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "m.gguf"), str(adapter), "--format", "json", "--exact"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["modules"]) == 10
    assert data["inputs"]["base"]["path"].endswith("m.gguf")


def test_quantization_entry(adapter_and_model, tmp_path):
    from ddiscan.sources import open_source
    from ddiscan.sketch import Sketch

    _, _, model = adapter_and_model
    write_gguf(tmp_path / "m.gguf", model, gguf.GGMLQuantizationType.Q4_K)
    source = open_source(str(tmp_path / "m.gguf"), sketch=Sketch(exact=True))
    assert source.quantization("model.layers.0.self_attn.q_proj.weight") == {"format": "gguf", "type": "Q4_K"}
    assert source.info("model.layers.0.mlp.down_proj.weight").shape == (HIDDEN, FFN)


@pytest.mark.parametrize("arch", sorted(ggufnames.ARCHITECTURES))
def test_name_map_inverts_gguf_tensor_name_map(arch):
    """Every name ddiscan maps is the one gguf's own TensorNameMap gives the HF key."""
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(model_arch, 3)
    tied = gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[model_arch]  # Gemma: no output head
    hf_keys = ["model.embed_tokens.weight"] + ["lm_head.weight"] * (not tied) + [
        f"model.layers.2.{m}.weight" for m in set(ggufnames.ARCHITECTURES[arch].values())]
    for key in hf_keys:
        name = name_map.get_name(key, try_suffixes=(".weight",))
        assert name is not None, key
        assert ggufnames.hf_name(name, arch) == key


def test_unsupported_type_is_refused(adapter_and_model, tmp_path):
    _, adapter, model = adapter_and_model
    path = tmp_path / "m.gguf"
    write_gguf(path, model, gguf.GGMLQuantizationType.Q8_0)
    from ddiscan.sources import gguf as source_module
    real = gguf.quants.dequantize

    def refuse(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise NotImplementedError("no")
        return real(data, qtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.quants, "dequantize", refuse)
        with pytest.raises(QuantizedBase, match=r"blk\.\d\.\w+\.weight \(model\..*\): GGUF type Q8_0, which the "
                                                r"installed gguf package cannot dequantize"):
            ddiscan.scan(str(path), adapter)
    assert source_module.GGUFSource


def test_unknown_architecture_and_bad_heads(adapter_and_model, tmp_path):
    _, adapter, model = adapter_and_model
    write_gguf(tmp_path / "x.gguf", model, gguf.GGMLQuantizationType.F32, arch="mamba")
    with pytest.raises(InputError, match=r"general\.architecture 'mamba'; ddiscan maps the tensor names of"):
        ddiscan.scan(str(tmp_path / "x.gguf"), adapter)
    with pytest.raises(InputError, match=r"64 rows do not split into 3 rotary heads"):
        ggufnames.unpermute(np.zeros((64, 8)), 3, "k")


def test_missing_gguf_package(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    from ddiscan.sources.gguf import GGUFSource
    from ddiscan.sketch import Sketch
    with pytest.raises(InputError, match=r"needs the optional gguf package: pip install 'ddiscan\[gguf\]'"):
        GGUFSource.accept(str(tmp_path / "m.gguf"), Sketch())


def _reference_pair(tmp, model, type_name):
    path = tmp / f"pair-{type_name}.gguf"
    write_gguf(path, model, gguf.GGMLQuantizationType[type_name])
    reference = tmp / f"pair-{type_name}.safetensors"
    reference_checkpoint(path, reference, model)
    return path, reference


def test_prune_dora_reset_on_gguf(adapter_and_model, tmp_path):
    """prune's DoRA reset needs W0's row norms: from a Q8_0 GGUF (q/k rows un-permuted) they
    equal those of gguf's own dequantization."""
    from safetensors.numpy import load_file

    _, _, model = adapter_and_model
    path, reference = _reference_pair(tmp_path, model, "Q8_0")
    dora = tiny_llama()
    dora.load_state_dict(model.state_dict())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_dora=True,
                             init_lora_weights=False)
    peft.get_peft_model(dora, config).save_pretrained(tmp_path / "dora")
    got = ddiscan.prune(str(path), tmp_path / "dora", tmp_path / "pruned-gguf", top=4, exact=True)
    expected = ddiscan.prune(reference, tmp_path / "dora", tmp_path / "pruned-ref", top=4, exact=True)
    assert got.selection.names == expected.selection.names and len(got.selection.names) == 4
    a = load_file(str(tmp_path / "pruned-gguf" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "pruned-ref" / "adapter_model.safetensors"))
    magnitudes = [k for k in b if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 4
    for key in magnitudes:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_profile_of_a_gguf_base(adapter_and_model, tmp_path):
    """A profile built from a Q4_0 GGUF scores as the exact scan of its dequantized reference."""
    _, adapter, model = adapter_and_model
    path, reference = _reference_pair(tmp_path, model, "Q4_0")
    summary = ddiscan.build_profile(str(path), tmp_path / "base.ddiprofile", max_t=8, exact=True)
    assert summary["weights"] == 14  # 7 projections in each of 2 blocks (no embeddings, no head)
    got = _ddi(ddiscan.scan(tmp_path / "base.ddiprofile", adapter))
    expected = _ddi(ddiscan.scan(reference, adapter, exact=True))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4), name
