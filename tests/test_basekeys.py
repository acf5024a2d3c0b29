"""ddiscan.basekeys: module names to base keys, the quantization check and the Conv1D evidence."""

from __future__ import annotations

import numpy as np
import pytest

from ddiscan.errors import QuantizedBase

from matching_helpers import by_name, match, peft_keys, weights
from safetensors_builders import (
    HIDDEN,
    llama_base_tensors,
    llama_peft_tensors,
    peft_config,
    rng,
    save,
    write_llama_pair,
    write_peft_dir,
)


def test_base_has_a_prefix_the_adapter_lacks(tmp_path):
    base = save(tmp_path / "base.safetensors", weights({
        "bert.encoder.layer.0.attention.self.query.weight": (8, 8),
        "bert.encoder.layer.0.attention.self.value.weight": (8, 8),
        "bert.pooler.dense.weight": (8, 8),
    }))
    adapter = write_peft_dir(tmp_path / "a", {
        **peft_keys("encoder.layer.0.attention.self.query", 8, 8, 2),
        **peft_keys("encoder.layer.0.attention.self.value", 8, 8, 2),
    }, peft_config(2, 2))
    modules, _, _ = match(base, adapter)
    assert [m.base_key for m in modules] == [
        "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.value.weight",
    ]


def test_adapter_has_a_prefix_the_base_lacks(tmp_path):
    base = save(tmp_path / "base.safetensors", weights({
        "encoder.layer.0.attention.self.query.weight": (8, 8),
        "embeddings.word_embeddings.weight": (20, 8),
    }))
    adapter = write_peft_dir(tmp_path / "a", peft_keys("bert.encoder.layer.0.attention.self.query", 8, 8, 2),
                             peft_config(2, 2))
    (m,), _, _ = match(base, adapter)
    assert m.name == "bert.encoder.layer.0.attention.self.query"
    assert m.base_key == "encoder.layer.0.attention.self.query.weight"


def test_exact_key_wins_over_suffix_matches(tmp_path):
    base = save(tmp_path / "base.safetensors", weights({
        "encoder.layer.0.query.weight": (8, 8),
        "other.encoder.layer.0.query.weight": (8, 8),
    }))
    adapter = write_peft_dir(tmp_path / "a", peft_keys("encoder.layer.0.query", 8, 8, 2), peft_config(2, 2))
    (m,), _, _ = match(base, adapter)
    assert m.base_key == "encoder.layer.0.query.weight"


def _gpt2_base(tmp_path, *, with_mlp=True):
    shapes = {
        "h.0.attn.c_attn.weight": (16, 48),
        "h.0.attn.c_proj.weight": (16, 16),
        "h.0.attn.bias": (1, 1, 4, 4),
        "wte.weight": (50, 16),
    }
    if with_mlp:
        shapes.update({"h.0.mlp.c_fc.weight": (16, 64), "h.0.mlp.c_proj.weight": (64, 16)})
    return save(tmp_path / "gpt2.safetensors", weights(shapes))


def test_gpt2_conv1d_transposed_and_square_c_proj_from_siblings(tmp_path):
    base = _gpt2_base(tmp_path)
    tensors = {
        **peft_keys("transformer.h.0.attn.c_attn", 48, 16, 2, seed=1),
        **peft_keys("transformer.h.0.attn.c_proj", 16, 16, 2, seed=2),
        **peft_keys("transformer.h.0.mlp.c_fc", 64, 16, 2, seed=3),
        **peft_keys("transformer.h.0.mlp.c_proj", 16, 64, 2, seed=4),
    }
    # fan_in_fan_out deliberately left out: the evidence must come from the shapes
    config = {k: v for k, v in peft_config(2, 4).items() if k != "fan_in_fan_out"}
    adapter = write_peft_dir(tmp_path / "a", tensors, config)
    modules = by_name(match(base, adapter)[0])
    assert modules["transformer.h.0.attn.c_attn"].base_key == "h.0.attn.c_attn.weight"
    for name, (d, k) in {"attn.c_attn": (48, 16), "attn.c_proj": (16, 16), "mlp.c_fc": (64, 16),
                         "mlp.c_proj": (16, 64)}.items():
        m = modules[f"transformer.h.0.{name}"]
        assert (m.d, m.k) == (d, k)
        assert m.transpose_base, name


def test_square_c_proj_alone_with_evidence_from_another_kind(tmp_path):
    base = _gpt2_base(tmp_path, with_mlp=False)
    tensors = {**peft_keys("h.0.attn.c_attn", 48, 16, 2, seed=1, prefix="base_model.model."),
               **peft_keys("h.0.attn.c_proj", 16, 16, 2, seed=2)}
    config = {k: v for k, v in peft_config(2, 4).items() if k != "fan_in_fan_out"}
    modules = by_name(match(base, write_peft_dir(tmp_path / "a", tensors, config))[0])
    assert modules["h.0.attn.c_proj"].transpose_base


def test_embedding_lora_is_no_evidence_about_conv1d(tmp_path):
    # GPT-2 with LoRA on wte (an embedding, stored as is) and the square attn.c_proj (a
    # Conv1D, stored in × out): an embedding says nothing about whether other layers are
    # Conv1D, so the adapter's fan_in_fan_out (True, as PEFT writes for GPT-2) must decide.
    base = _gpt2_base(tmp_path, with_mlp=False)
    g = rng(7)
    tensors = {
        "base_model.model.transformer.wte.lora_embedding_A": g.standard_normal((2, 50)).astype(np.float32),
        "base_model.model.transformer.wte.lora_embedding_B": g.standard_normal((16, 2)).astype(np.float32),
        **peft_keys("transformer.h.0.attn.c_proj", 16, 16, 2, seed=2),
    }
    adapter = write_peft_dir(tmp_path / "a", tensors, peft_config(2, 4, fan_in_fan_out=True))
    modules = by_name(match(base, adapter)[0])
    assert modules["transformer.wte"].layout == "embedding" and not modules["transformer.wte"].transpose_base
    assert modules["transformer.h.0.attn.c_proj"].transpose_base


def test_square_linear_is_not_transposed(tmp_path):
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=llama_peft_tensors(1, 4, projs=("q_proj", "o_proj")),
                                     config=peft_config(4, 8))
    modules, _, _ = match(base, adapter)
    assert [m.transpose_base for m in modules] == [False, False]


def test_square_weight_follows_fan_in_fan_out_without_evidence(tmp_path):
    base = save(tmp_path / "b.safetensors", weights({"blocks.0.attn.out.weight": (8, 8)}))
    adapter = write_peft_dir(tmp_path / "a", peft_keys("blocks.0.attn.out", 8, 8, 2), peft_config(2, 2, fan_in_fan_out=True))
    (m,), _, _ = match(base, adapter)
    assert m.transpose_base


@pytest.mark.parametrize("sibling", ["model.layers.0.self_attn.q_proj.weight.absmax",
                                     "model.layers.0.self_attn.q_proj.weight.quant_map",
                                     "model.layers.0.self_attn.q_proj.weight_scale_inv",
                                     "model.layers.0.self_attn.q_proj.SCB"])


def test_quantized_base_by_sibling(tmp_path, sibling):
    tensors = llama_base_tensors(1)
    tensors[sibling] = np.ones(4, np.float32)
    base, adapter = write_llama_pair(tmp_path, layers=1, base_tensors=tensors,
                                     adapter_tensors=llama_peft_tensors(1, 4, projs=("q_proj",)))
    with pytest.raises(QuantizedBase) as info:
        match(base, adapter)
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value) and sibling in str(info.value)


def test_quantized_base_by_dtype(tmp_path):
    tensors = llama_base_tensors(1)
    tensors["model.layers.0.self_attn.q_proj.weight"] = rng(0).integers(0, 255, (HIDDEN, HIDDEN), dtype=np.uint8)
    base, adapter = write_llama_pair(tmp_path, layers=1, base_tensors=tensors,
                                     adapter_tensors=llama_peft_tensors(1, 4, projs=("q_proj",)))
    with pytest.raises(QuantizedBase) as info:
        match(base, adapter)
    assert "U8" in str(info.value) and "model.layers.0.self_attn.q_proj.weight" in str(info.value)


def test_packed_4bit_base_is_quantized_not_a_shape_mismatch(tmp_path):
    # bitsandbytes 4-bit: the weight is U8 of shape (d*k/2, 1) with an absmax beside it
    tensors = llama_base_tensors(1)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((HIDDEN * HIDDEN // 2, 1), np.uint8)
    tensors["model.layers.0.self_attn.q_proj.weight.absmax"] = np.ones(4, np.float32)
    base, adapter = write_llama_pair(tmp_path, layers=1, base_tensors=tensors,
                                     adapter_tensors=llama_peft_tensors(1, 4, projs=("q_proj",)))
    with pytest.raises(QuantizedBase):
        match(base, adapter)


def test_lm_head_lora_on_a_tied_checkpoint_scores_the_input_embedding(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    import ddiscan
    from ddiscan.io import TensorIndex

    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.standard_normal((50, 16)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float32)},
              tmp_path / "base.safetensors")
    save_file({"base_model.model.lm_head.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
               "base_model.model.lm_head.lora_B.weight": rng.standard_normal((50, 2)).astype(np.float32)},
              tmp_path / "a.safetensors")
    modules, _, warnings = ddiscan.lora.match_modules(ddiscan.lora.load_adapter(tmp_path / "a.safetensors"),
                                                 TensorIndex(tmp_path / "base.safetensors"), scaling=1.0)
    assert [(m.name, m.base_key) for m in modules] == [("lm_head", "model.embed_tokens.weight")]
    assert any("tied" in w for w in warnings)
