"""ddiscan.scaling: the scaling s of each module, from the config, a .alpha tensor or an override."""

from __future__ import annotations

import math

import pytest

from ddiscan.errors import InputError, ShapeMismatch

from matching_helpers import by_name, match
from safetensors_builders import llama_peft_tensors, peft_config, write_llama_pair


def test_mergekit_style_rank_pattern(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 6, "model.layers.1.self_attn.v_proj": 2}
    tensors = llama_peft_tensors(2, 4, ranks=ranks)
    config = peft_config(4, 4, rank_pattern=dict(ranks), alpha_pattern=dict(ranks))
    base, adapter = write_llama_pair(tmp_path, adapter_tensors=tensors, config=config)
    modules = by_name(match(base, adapter)[0])
    assert modules["model.layers.0.self_attn.q_proj"].r == 6
    assert modules["model.layers.1.self_attn.v_proj"].r == 2
    assert modules["model.layers.1.self_attn.q_proj"].r == 4
    assert {m.scale for m in modules.values()} == {1.0}


def test_rslora(tmp_path):
    base, adapter = write_llama_pair(tmp_path, r=4, config=peft_config(4, 8, use_rslora=True))
    modules, _, _ = match(base, adapter)
    assert [m.scale for m in modules] == pytest.approx([8 / math.sqrt(4)] * 8)
    assert all("rsLoRA" in m.scale_source or "sqrt" in m.scale_source for m in modules)


def test_rank_and_alpha_patterns_follow_peft_rule(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 8}
    tensors = llama_peft_tensors(2, 4, ranks=ranks)
    config = peft_config(
        4, 8,
        # "q_proj" matches both q_proj modules (end of name, after a dot)
        rank_pattern={"q_proj": 8},
        # first matching key wins; "proj" alone matches nothing ("(.*\.)?(proj)$" needs a dot before it);
        # "layers.1.self_attn.v_proj" matches only that module
        alpha_pattern={"proj": 1000, "self_attn.q_proj": 64, "q_proj": 2, "layers.1.self_attn.v_proj": 40},
    )
    base, adapter = write_llama_pair(tmp_path, adapter_tensors=tensors, config=config)
    m = by_name(match(base, adapter)[0])
    assert m["model.layers.0.self_attn.q_proj"].scale == pytest.approx(64 / 8)
    assert m["model.layers.1.self_attn.q_proj"].scale == pytest.approx(64 / 8)
    assert m["model.layers.1.self_attn.v_proj"].scale == pytest.approx(40 / 4)
    assert m["model.layers.0.self_attn.v_proj"].scale == pytest.approx(8 / 4)
    assert m["model.layers.0.self_attn.k_proj"].scale == pytest.approx(8 / 4)


def test_pattern_is_a_regex(tmp_path):
    config = peft_config(4, 8, alpha_pattern={r"layers\.[01]\.self_attn\.(k|v)_proj": 16})
    base, adapter = write_llama_pair(tmp_path, config=config)
    m = by_name(match(base, adapter)[0])
    assert m["model.layers.1.self_attn.k_proj"].scale == pytest.approx(4.0)
    assert m["model.layers.0.self_attn.v_proj"].scale == pytest.approx(4.0)
    assert m["model.layers.0.self_attn.q_proj"].scale == pytest.approx(2.0)


def test_config_rank_contradicting_tensors_is_an_error(tmp_path):
    base, adapter = write_llama_pair(tmp_path, r=4, config=peft_config(8, 16))
    with pytest.raises(ShapeMismatch) as info:
        match(base, adapter)
    assert "r=8" in str(info.value) and "rank 4" in str(info.value)


def test_config_without_numeric_r_is_an_error(tmp_path):
    base, adapter = write_llama_pair(tmp_path, r=4, config={"peft_type": "LORA", "r": "four", "lora_alpha": 8})
    with pytest.raises(InputError) as info:
        match(base, adapter)
    assert "adapter_config.json" in str(info.value)


def test_alpha_and_scaling_overrides(tmp_path):
    base, adapter = write_llama_pair(tmp_path, r=4, config=peft_config(4, 8))
    modules, _, _ = match(base, adapter, alpha=1.0)
    assert {m.scale for m in modules} == {0.25}
    assert all("--alpha" in m.scale_source for m in modules)
    modules, _, _ = match(base, adapter, scaling=3.0)
    assert {m.scale for m in modules} == {3.0}
    assert all("--scaling" in m.scale_source for m in modules)


def test_no_config_scale_one_with_warning(tmp_path):
    base, adapter = write_llama_pair(tmp_path, r=4)
    (adapter / "adapter_config.json").unlink()
    modules, _, warnings = match(base, adapter)
    assert {m.scale for m in modules} == {1.0}
    assert len(warnings) == 1 and "--alpha" in warnings[0]
