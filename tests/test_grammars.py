"""ddiscan.grammars: which adapter tensor is which factor, and why every other one is passed over."""

from __future__ import annotations

import numpy as np

from matching_helpers import match
from safetensors_builders import HIDDEN, VOCAB, llama_peft_tensors, write_llama_pair


def test_skipped_tensors_have_reasons(tmp_path):
    tensors = {
        **llama_peft_tensors(1, 4, projs=("q_proj",)),
        "base_model.model.lm_head.weight": np.ones((VOCAB, HIDDEN), np.float32),
        "base_model.model.score.modules_to_save.default.weight": np.ones((2, HIDDEN), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.bias": np.ones(HIDDEN, np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": np.ones(HIDDEN, np.float32),
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": np.ones((2, HIDDEN), np.float32),
    }
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors)
    (module,), skipped, _ = match(base, adapter)
    assert module.name == "model.layers.0.self_attn.q_proj"
    # lora_B.bias (PEFT's lora_bias=True) is part of the module's update, not skipped
    assert module.bias_key == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    reasons = {s.key: s.reason for s in skipped}
    assert reasons == {
        "base_model.model.lm_head.weight": "full weight (modules_to_save)",
        "base_model.model.score.modules_to_save.default.weight": "full weight (modules_to_save)",
        "base_model.model.model.layers.0.self_attn.q_proj.bias": "bias",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": "trainable tokens",
    }


def test_each_layout_by_its_key_names_alone():
    from ddiscan.grammars import classify

    keys = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",  # PEFT
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "lora_unet_down_blocks_0_proj_in.lora_down.weight",  # kohya
        "lora_unet_down_blocks_0_proj_in.lora_up.weight",
        "lora_unet_down_blocks_0_proj_in.alpha",
        "mid_block.attentions.0.processor.to_out_lora.down.weight",  # diffusers before PEFT
        "mid_block.attentions.0.processor.to_out_lora.up.weight",
        "model.layers.0.mlp.up_proj.lora_a",  # MLX-LM: lora_a is downᵀ, lora_b upᵀ
        "model.layers.0.mlp.down_proj.hada_w1_a",  # LoHa
        "base_model.model.model.norm.weight",  # a full weight PEFT saved
        "model.layers.0.mlp.up_proj.lora_b",
        "model.layers.0.mlp.up_proj.m",  # MLX-LM DoRA's magnitude
        "model.embed_tokens.lora_a",  # an MLX-LM embedding: lora_a is up, lora_b down, as stored
        "model.embed_tokens.lora_b",
        "model.norm.m",  # no lora_a beside it: not a magnitude
        "lycoris_fc.lokr_t1",  # a LoKr part no writer fills (LyCORIS lists it, never creates it)
    ]
    pairs, skipped, unread = classify(keys)
    assert {name: (p.style, p.down is not None, p.up is not None, p.dora or p.alpha) for name, p in pairs.items()} == {
        "model.layers.0.self_attn.q_proj": ("peft", True, True, keys[2]),
        "lora_unet_down_blocks_0_proj_in": ("kohya", True, True, keys[5]),
        "mid_block.attentions.0.to_out.0": ("diffusers", True, True, None),
        "model.layers.0.mlp.up_proj": ("mlx", True, True, keys[12]),
        "model.embed_tokens": ("mlx", True, True, None),
        "model.layers.0.mlp.down_proj": ("peft", False, False, None),
    }
    assert (pairs["model.layers.0.mlp.up_proj"].down, pairs["model.layers.0.mlp.up_proj"].up) == (keys[8], keys[11])
    assert (pairs["model.embed_tokens"].up, pairs["model.embed_tokens"].down) == (keys[13], keys[14])
    assert pairs["model.layers.0.mlp.down_proj"].parts == {"hada_w1_a": keys[9]}
    assert [(s.key, s.reason) for s in skipped] == [(keys[10], "full weight (modules_to_save)"),
                                                   (keys[15], "not a LoRA tensor")]
    assert [(s.key, s.reason) for s in unread] == [(keys[16], "LoKr tensor (not LoRA; not supported yet)")]
