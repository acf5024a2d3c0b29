"""LoRA key layouts (PEFT, diffusers, mergekit, kohya) matched to base weights, with scaling.

Every layout is built here with numpy and saved with the safetensors library; the expected
base key, shape (d, k), rank and scale of each module are written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ddiscan
import ddiscan.io
import ddiscan.lora
import ddiscan.io.reader
from ddiscan.errors import InputError, MatchError, NoLoraPairs, ShapeMismatch
from ddiscan.io import TensorIndex

from matching_helpers import by_name, kohya_keys, match, peft_keys, weights
from safetensors_builders import (
    HIDDEN,
    KV_DIM,
    LLAMA_PROJ,
    VOCAB,
    llama_base_tensors,
    llama_peft_tensors,
    peft_config,
    rng,
    save,
    write_index,
    write_llama_pair,
    write_peft_dir,
)


# ---------------------------------------------------------------------------------------
# PEFT, LLaMA-style


def test_peft_llama_grouped_query(tmp_path):
    base, adapter = write_llama_pair(tmp_path, layers=2, r=4, config=peft_config(4, 8))
    modules, skipped, warnings = match(base, adapter)
    assert [m.name for m in modules] == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in LLAMA_PROJ
    )
    for m in modules:
        proj = m.name.rsplit(".", 1)[-1]
        assert m.base_key == m.name + ".weight"
        assert (m.d, m.k) == LLAMA_PROJ[proj]
        assert m.r == 4 and m.layout == "linear" and not m.transpose_base
        assert m.scale == pytest.approx(2.0)
        assert m.up_key == f"base_model.model.{m.name}.lora_B.weight"
        assert m.down_key == f"base_model.model.{m.name}.lora_A.weight"
    kv = by_name(modules)["model.layers.1.self_attn.k_proj"]
    assert (kv.d, kv.k) == (KV_DIM, HIDDEN) and kv.kind == "k_proj" and kv.block == 1
    assert skipped == [] and warnings == []


def test_adapter_name_in_keys(tmp_path):
    tensors = llama_peft_tensors(1, 4, adapter_name="default")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in tensors
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    modules, _, _ = match(base, adapter)
    assert len(modules) == 4
    q = by_name(modules)["model.layers.0.self_attn.q_proj"]
    assert q.base_key == "model.layers.0.self_attn.q_proj.weight"
    assert q.down_key.endswith("lora_A.default.weight")


def test_two_adapter_names_in_one_file_refused(tmp_path):
    tensors = {**llama_peft_tensors(1, 4, projs=("q_proj",), adapter_name="one"),
               **llama_peft_tensors(1, 4, projs=("v_proj",), adapter_name="two")}
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    with pytest.raises(InputError) as info:
        match(base, adapter)
    assert "one" in str(info.value) and "two" in str(info.value)


def test_ambiguous_base_key_names_both_candidates(tmp_path):
    base = save(tmp_path / "base.safetensors", weights({
        "text.encoder.layer.0.query.weight": (8, 8),
        "vision.encoder.layer.0.query.weight": (8, 8),
    }))
    adapter = write_peft_dir(tmp_path / "a", peft_keys("encoder.layer.0.query", 8, 8, 2), peft_config(2, 2))
    with pytest.raises(MatchError) as info:
        match(base, adapter)
    message = str(info.value)
    assert "text.encoder.layer.0.query.weight" in message and "vision.encoder.layer.0.query.weight" in message


def test_bert_keys(tmp_path):
    layer = "bert.encoder.layer.0"
    base = save(tmp_path / "base.safetensors", weights({
        "bert.embeddings.word_embeddings.weight": (30, 8),
        f"{layer}.attention.self.query.weight": (8, 8),
        f"{layer}.attention.self.key.weight": (8, 8),
        f"{layer}.attention.self.value.weight": (8, 8),
        f"{layer}.attention.output.dense.weight": (8, 8),
        f"{layer}.attention.output.dense.bias": (8,),
        f"{layer}.intermediate.dense.weight": (32, 8),
        f"{layer}.output.dense.weight": (8, 32),
        "classifier.weight": (2, 8),
    }))
    names = {
        "encoder.layer.0.attention.self.query": (8, 8),
        "encoder.layer.0.attention.output.dense": (8, 8),
        "encoder.layer.0.intermediate.dense": (32, 8),
        "encoder.layer.0.output.dense": (8, 32),
    }
    tensors = {}
    for i, (name, (d, k)) in enumerate(names.items()):
        tensors.update(peft_keys(name, d, k, 2, seed=i))
    adapter = write_peft_dir(tmp_path / "a", tensors, peft_config(2, 4))
    modules, _, _ = match(base, adapter)
    got = {m.name: (m.base_key, m.d, m.k) for m in modules}
    assert got == {name: ("bert." + name + ".weight", d, k) for name, (d, k) in names.items()}


# ---------------------------------------------------------------------------------------
# GPT-2 Conv1D: weights stored (in, out)


# ---------------------------------------------------------------------------------------
# Embeddings


def test_lora_embedding(tmp_path):
    base = save(tmp_path / "base.safetensors", llama_base_tensors(1))
    r = 4
    g = rng(7)
    tensors = {
        "base_model.model.model.embed_tokens.lora_embedding_A": g.standard_normal((r, VOCAB)).astype(np.float32),
        "base_model.model.model.embed_tokens.lora_embedding_B": g.standard_normal((HIDDEN, r)).astype(np.float32),
        **llama_peft_tensors(1, r, projs=("q_proj",)),
    }
    adapter = write_peft_dir(tmp_path / "a", tensors, peft_config(r, 8))
    modules = by_name(match(base, adapter)[0])
    emb = modules["model.embed_tokens"]
    assert emb.layout == "embedding"
    assert emb.base_key == "model.embed_tokens.weight"
    assert (emb.d, emb.k, emb.r) == (VOCAB, HIDDEN, r)
    assert emb.scale == pytest.approx(2.0)
    assert not emb.transpose_base


# ---------------------------------------------------------------------------------------
# kohya / sd-scripts


def _unet_base(tmp_path):
    return save(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", weights({
        "down_blocks.0.attentions.0.proj_in.weight": (32, 16),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (32, 32),
        "down_blocks.0.resnets.0.conv1.weight": (24, 16, 3, 3),
        "down_blocks.0.resnets.0.conv1.bias": (24,),
        "up_blocks.0.attentions.0.proj_in.weight": (32, 16),
    }))


def test_kohya_unet_with_alpha(tmp_path):
    base = _unet_base(tmp_path)
    tensors = {
        **kohya_keys("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 16, 4, alpha=2.0, seed=1),
        **kohya_keys("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32, 8, alpha=4.0, seed=2),
    }
    adapter = save(tmp_path / "lora.safetensors", tensors)
    modules, skipped, warnings = match(base, adapter)
    m = by_name(modules)
    proj = m["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert proj.base_key == "down_blocks.0.attentions.0.proj_in.weight"
    assert (proj.d, proj.k, proj.r) == (32, 16, 4)
    assert proj.scale == pytest.approx(0.5)
    assert proj.alpha_key == "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"
    assert proj.up_key.endswith(".lora_up.weight") and proj.down_key.endswith(".lora_down.weight")
    to_q = m["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert to_q.base_key == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert to_q.scale == pytest.approx(0.5)
    assert skipped == [] and warnings == []


def test_kohya_without_alpha_scale_one_and_warning(tmp_path):
    base = _unet_base(tmp_path)
    adapter = save(tmp_path / "lora.safetensors", kohya_keys("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 16, 4))
    (m,), _, warnings = match(base, adapter)
    assert m.scale == 1.0 and m.alpha_key is None
    assert any("scaling" in w for w in warnings)
    # an override silences the warning and sets the scale
    (m,), _, warnings = match(base, adapter, alpha=8.0)
    assert m.scale == pytest.approx(2.0) and warnings == []


def test_kohya_text_encoder(tmp_path):
    base = save(tmp_path / "te.safetensors", weights({
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (16, 16),
        "text_model.encoder.layers.0.self_attn.k_proj.weight": (16, 16),
        "text_model.encoder.layers.0.mlp.fc1.weight": (64, 16),
    }))
    tensors = {
        **kohya_keys("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 16, 16, 4, alpha=4.0, seed=1),
        **kohya_keys("lora_te_text_model_encoder_layers_0_mlp_fc1", 64, 16, 4, alpha=1.0, seed=2),
    }
    modules = by_name(match(base, save(tmp_path / "lora.safetensors", tensors))[0])
    q = modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert q.base_key == "text_model.encoder.layers.0.self_attn.q_proj.weight" and q.scale == pytest.approx(1.0)
    fc1 = modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert fc1.base_key == "text_model.encoder.layers.0.mlp.fc1.weight"
    assert (fc1.d, fc1.k) == (64, 16) and fc1.scale == pytest.approx(0.25)


def test_kohya_conv_lora(tmp_path):
    base = _unet_base(tmp_path)
    g = rng(3)
    r, out_ch, in_ch = 4, 24, 16
    tensors = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": g.standard_normal((r, in_ch, 3, 3)).astype(np.float32),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": g.standard_normal((out_ch, r, 1, 1)).astype(np.float32),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": np.array(1.0, np.float32),
    }
    (m,), _, _ = match(base, save(tmp_path / "lora.safetensors", tensors))
    assert m.base_key == "down_blocks.0.resnets.0.conv1.weight"
    assert m.layout == "conv"
    assert (m.d, m.k, m.r) == (out_ch, in_ch * 9, r)
    assert m.scale == pytest.approx(0.25)
    assert not m.transpose_base


def test_peft_conv_lora(tmp_path):
    base = save(tmp_path / "b.safetensors", weights({"conv_in.weight": (24, 16, 3, 3)}))
    g = rng(4)
    tensors = {
        "base_model.model.conv_in.lora_A.weight": g.standard_normal((2, 16, 3, 3)).astype(np.float32),
        "base_model.model.conv_in.lora_B.weight": g.standard_normal((24, 2, 1, 1)).astype(np.float32),
    }
    (m,), _, _ = match(base, write_peft_dir(tmp_path / "a", tensors, peft_config(2, 4)))
    assert (m.layout, m.d, m.k, m.r, m.scale) == ("conv", 24, 144, 2, pytest.approx(2.0))


def test_conv_lora_against_wrong_kernel_is_a_shape_mismatch(tmp_path):
    base = save(tmp_path / "b.safetensors", weights({"conv_in.weight": (24, 16, 1, 1)}))
    g = rng(4)
    tensors = {
        "base_model.model.conv_in.lora_A.weight": g.standard_normal((2, 16, 3, 3)).astype(np.float32),
        "base_model.model.conv_in.lora_B.weight": g.standard_normal((24, 2, 1, 1)).astype(np.float32),
    }
    with pytest.raises(ShapeMismatch) as info:
        match(base, write_peft_dir(tmp_path / "a", tensors, peft_config(2, 4)))
    assert "conv_in.weight" in str(info.value)


# ---------------------------------------------------------------------------------------
# diffusers (unet.-prefixed PEFT keys, config in __metadata__)


def _diffusers_adapter(tmp_path, metadata_config: dict, ranks=(4, 8)) -> Path:
    tensors = {
        **peft_keys("unet.down_blocks.0.attentions.0.proj_in", 32, 16, ranks[0], seed=1, prefix=""),
        **peft_keys("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32, ranks[1], seed=2, prefix=""),
    }
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    return save(path, tensors, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata_config)})


def test_diffusers_flat_metadata_config(tmp_path):
    base = _unet_base(tmp_path)
    adapter = _diffusers_adapter(tmp_path, {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 8}, "alpha_pattern": {}})
    modules = by_name(match(base, adapter)[0])
    proj = modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert proj.base_key == "down_blocks.0.attentions.0.proj_in.weight"
    assert proj.scale == pytest.approx(2.0)
    assert "lora_adapter_metadata" in proj.scale_source
    to_q = modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert to_q.r == 8 and to_q.scale == pytest.approx(1.0)


def test_diffusers_per_component_metadata_config(tmp_path):
    base = _unet_base(tmp_path)
    config = {"unet.r": 4, "unet.lora_alpha": 4, "unet.rank_pattern": {"to_q": 8}, "unet.alpha_pattern": {"to_q": 32},
              "text_encoder.r": 16, "text_encoder.lora_alpha": 1}
    modules = by_name(match(base, _diffusers_adapter(tmp_path, config))[0])
    assert modules["unet.down_blocks.0.attentions.0.proj_in"].scale == pytest.approx(1.0)
    assert modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].scale == pytest.approx(4.0)


def test_diffusers_metadata_not_json(tmp_path):
    base = _unet_base(tmp_path)
    tensors = peft_keys("unet.down_blocks.0.attentions.0.proj_in", 32, 16, 4, prefix="")
    adapter = save(tmp_path / "l.safetensors", tensors, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(InputError) as info:
        match(base, adapter)
    assert "lora_adapter_metadata" in str(info.value) and str(adapter) in str(info.value)


# ---------------------------------------------------------------------------------------
# Scaling


# ---------------------------------------------------------------------------------------
# Sharded bases


def _sharded(tmp_path):
    tensors = llama_base_tensors(2)
    shard1 = {k: v for k, v in tensors.items() if ".layers.0." in k or k == "model.embed_tokens.weight"}
    shard3 = {"lm_head.weight": tensors["lm_head.weight"]}
    shard2 = {k: v for k, v in tensors.items() if k not in shard1 and k not in shard3}
    return write_index(tmp_path / "base", {
        "model-00001-of-00003.safetensors": shard1,
        "model-00002-of-00003.safetensors": shard2,
        "model-00003-of-00003.safetensors": shard3,
    })


@pytest.mark.parametrize("given", ["directory", "index"])
def test_sharded_base_with_index(tmp_path, given):
    index = _sharded(tmp_path)
    adapter = write_peft_dir(tmp_path / "a", llama_peft_tensors(2, 4), peft_config(4, 8))
    modules, _, _ = match(index.parent if given == "directory" else index, adapter)
    assert len(modules) == 8
    base = TensorIndex(index.parent if given == "directory" else index)
    assert base.weight_map["model.layers.1.self_attn.v_proj.weight"].name == "model-00002-of-00003.safetensors"


def test_directory_of_shards_without_index(tmp_path):
    index = _sharded(tmp_path)
    index.unlink()
    adapter = write_peft_dir(tmp_path / "a", llama_peft_tensors(2, 4), peft_config(4, 8))
    modules, _, _ = match(index.parent, adapter)
    assert {m.base_key for m in modules} == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in LLAMA_PROJ}


def test_directory_of_shards_with_a_key_twice(tmp_path):
    save(tmp_path / "b" / "one.safetensors", weights({"x.weight": (4, 4)}))
    save(tmp_path / "b" / "two.safetensors", weights({"x.weight": (4, 4)}))
    with pytest.raises(InputError) as info:
        TensorIndex(tmp_path / "b")
    assert "x.weight" in str(info.value)


def test_index_naming_a_missing_shard(tmp_path):
    index = _sharded(tmp_path)
    (index.parent / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(InputError) as info:
        TensorIndex(index)
    assert "model-00003-of-00003.safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------
# What does not match


def test_unmatched_module_is_an_error_or_a_warning(tmp_path):
    tensors = {**llama_peft_tensors(1, 4, projs=("q_proj",)), **peft_keys("model.layers.0.mlp.gate_proj", 32, 16, 4)}
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors, config=peft_config(4, 8))
    with pytest.raises(MatchError) as info:
        match(base, adapter)
    assert "model.layers.0.mlp.gate_proj" in str(info.value)
    modules, _, warnings = match(base, adapter, allow_unmatched=True)
    assert [m.name for m in modules] == ["model.layers.0.self_attn.q_proj"]
    assert any("model.layers.0.mlp.gate_proj" in w for w in warnings)


def test_nothing_matches_even_when_allowed(tmp_path):
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=peft_keys("decoder.block.0.q", 16, 16, 4))
    with pytest.raises(InputError):
        match(base, adapter, allow_unmatched=True)


def test_lora_a_without_lora_b(tmp_path):
    tensors = llama_peft_tensors(1, 4, projs=("q_proj", "v_proj"))
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    with pytest.raises(MatchError) as info:
        match(base, adapter)
    assert "model.layers.0.self_attn.v_proj.lora_A" in str(info.value)


def test_lora_b_without_lora_a(tmp_path):
    tensors = llama_peft_tensors(1, 4, projs=("q_proj",))
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    with pytest.raises(MatchError) as info:
        match(base, adapter)
    assert "model.layers.0.self_attn.q_proj.lora_B" in str(info.value)


def test_no_lora_tensors_at_all(tmp_path):
    base, _ = write_llama_pair(tmp_path, layers=1)
    adapter = save(tmp_path / "x.safetensors", {"something.else": np.ones(3, np.float32)})
    with pytest.raises(NoLoraPairs) as info:
        match(base, adapter)
    assert str(adapter) in str(info.value)


def test_shape_mismatch_with_base(tmp_path):
    # a LoRA for hidden 16 against k/v of kv_dim 8, but claimed on q_proj of another size
    tensors = peft_keys("model.layers.0.self_attn.k_proj", HIDDEN, HIDDEN, 4)
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    with pytest.raises(ShapeMismatch) as info:
        match(base, adapter)
    assert "model.layers.0.self_attn.k_proj.weight" in str(info.value)


@pytest.mark.parametrize("suffix", ["lora_magnitude_vector", "lora_magnitude_vector.weight"])
def test_dora_magnitude_vector_warns(tmp_path, suffix):
    tensors = llama_peft_tensors(1, 4, projs=("q_proj",))
    tensors[f"base_model.model.model.layers.0.self_attn.q_proj.{suffix}"] = np.ones(HIDDEN, np.float32)
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors, config=peft_config(4, 8, use_dora=True))
    (m,), skipped, warnings = match(base, adapter)
    assert m.dora_key == f"base_model.model.model.layers.0.self_attn.q_proj.{suffix}"
    assert skipped == []
    assert any("DoRA" in w for w in warnings)


# ---------------------------------------------------------------------------------------
# The scan reads only what it needs


def _record_reads(monkeypatch):
    mapped: list[tuple[str, str]] = []
    opened: list[str] = []
    original_array = ddiscan.io.reader.SafetensorsFile.mapped
    original_init = ddiscan.io.reader.SafetensorsFile.__init__

    def array(self, name):
        mapped.append((Path(self.path).name, name))
        return original_array(self, name)

    def init(self, path):
        opened.append(Path(path).name)
        original_init(self, path)

    monkeypatch.setattr(ddiscan.io.reader.SafetensorsFile, "mapped", array)  # every read maps
    monkeypatch.setattr(ddiscan.io.reader.SafetensorsFile, "__init__", init)
    return mapped, opened


def test_scan_maps_only_matched_base_tensors(tmp_path, monkeypatch):
    tensors = llama_peft_tensors(2, 4, projs=("q_proj", "v_proj"))
    base, adapter = write_llama_pair(tmp_path, adapter_tensors=tensors, config=peft_config(4, 8))
    mapped, _ = _record_reads(monkeypatch)
    report = ddiscan.scan(base, adapter)
    assert len(report.modules) == 4
    base_reads = {name for file, name in mapped if file == "model.safetensors"}
    adapter_reads = {name for file, name in mapped if file == "adapter_model.safetensors"}
    assert base_reads == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    assert adapter_reads == set(tensors)


def test_scan_never_opens_a_shard_without_matched_tensors(tmp_path, monkeypatch):
    index = _sharded(tmp_path)
    # only layer 1 is adapted: its tensors all sit in shard 2
    tensors = {k: v for k, v in llama_peft_tensors(2, 4).items() if ".layers.1." in k}
    adapter = write_peft_dir(tmp_path / "a", tensors, peft_config(4, 8))
    mapped, opened = _record_reads(monkeypatch)
    report = ddiscan.scan(index, adapter)
    assert len(report.modules) == 4
    assert "model-00001-of-00003.safetensors" not in opened
    assert "model-00003-of-00003.safetensors" not in opened
    assert "model-00002-of-00003.safetensors" in opened
    base_reads = {name for file, name in mapped if file.startswith("model-")}
    assert base_reads == {f"model.layers.1.self_attn.{p}.weight" for p in LLAMA_PROJ}
