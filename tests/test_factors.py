"""ddiscan.factors: the shapes of a LoRA pair's factors, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest

from ddiscan.errors import InputError, ShapeMismatch

from matching_helpers import match, weights
from safetensors_builders import HIDDEN, peft_config, rng, save, write_llama_pair


def test_rank_mismatch_between_a_and_b(tmp_path):
    g = rng(0)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": g.standard_normal((4, HIDDEN)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": g.standard_normal((HIDDEN, 3)).astype(np.float32),
    }
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    with pytest.raises(ShapeMismatch) as info:
        match(base, adapter)
    assert "q_proj.lora_B.weight" in str(info.value)


@pytest.mark.parametrize("style", ["peft config r=0", "peft --scaling", "peft --alpha", "kohya alpha"])
def test_rank_zero_factors_are_refused(tmp_path, style):
    if style.startswith("kohya"):
        base = save(tmp_path / "te.safetensors", weights({"text_model.encoder.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN)}))
        name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        adapter = save(tmp_path / "lora.safetensors", {
            f"{name}.lora_down.weight": np.zeros((0, HIDDEN), np.float32),
            f"{name}.lora_up.weight": np.zeros((HIDDEN, 0), np.float32),
            f"{name}.alpha": np.array(1.0, np.float32),
        })
    else:
        stem = "base_model.model.model.layers.0.self_attn.q_proj"
        name = "model.layers.0.self_attn.q_proj"
        tensors = {f"{stem}.lora_A.weight": np.zeros((0, HIDDEN), np.float32),
                   f"{stem}.lora_B.weight": np.zeros((HIDDEN, 0), np.float32)}
        base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors, config=peft_config(0, 8))
    options = {"peft --scaling": {"scaling": 1.0}, "peft --alpha": {"alpha": 1.0}}.get(style, {})
    with pytest.raises(InputError) as info:
        match(base, adapter, **options)
    # a config saying r=0 is refused by its field, options or not (PEFT itself requires r > 0)
    expected = "'r' must be a positive integer" if style.startswith("peft") else name
    assert expected in str(info.value)


def test_one_dimensional_factor_is_a_shape_mismatch(tmp_path):
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones(HIDDEN, np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((HIDDEN, 1), np.float32),
    }
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    with pytest.raises(ShapeMismatch):
        match(base, adapter)
