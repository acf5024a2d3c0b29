"""llama.cpp's GGUF tensor names and the Hugging Face names an adapter uses (issue 17, item 5).

The table inverts llama.cpp's ``gguf-py/gguf/tensor_mapping.py`` (``TensorNameMap``, which
``convert_hf_to_gguf.py`` uses to name what it writes) for the weights a LoRA adapter can
update: the attention and MLP projections of each block (``blk.N.<name>.weight``), the input
embedding and the output head. Norms, biases and other vectors are not mapped (no adapter
updates them; Gemma's norms are stored plus one).

``convert_hf_to_gguf.py``'s ``LlamaModel.modify_tensors`` (LLaMA, and Mistral, which it writes
with ``general.architecture = "llama"``) permutes the rows of ``q_proj`` and ``k_proj`` for
llama.cpp's rotary embedding:
``LlamaModel.permute(w, n_head, n_head_kv)``:
``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`` (with
``n_head = n_head_kv`` for k_proj); :func:`unpermute` undoes it. Qwen2/3, Gemma and Phi-3
are written unpermuted. Phi-3 stores its fused ``qkv_proj`` and ``gate_up_proj`` as
``attn_qkv`` and ``ffn_up``, as its Hugging Face checkpoint does: an adapter of Phi-3 targets
those; one naming ``q_proj`` matches no base weight (the usual error).
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import InputError

__all__ = ["ARCHITECTURES", "hf_name", "permuted_heads", "unpermute"]

_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_PHI3 = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
         "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output": "lm_head"}

ARCHITECTURES = {arch: _BLOCK for arch in ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")}
ARCHITECTURES["phi3"] = _PHI3
# the architectures whose q/k rows convert_hf_to_gguf.py permutes (LlamaModel and its subclasses)
PERMUTED = frozenset({"llama"})

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")


def hf_name(name: str, arch: str) -> str | None:
    """The Hugging Face key of GGUF tensor ``name`` in a model of ``arch``, or None if no
    adapter updates it."""
    table = ARCHITECTURES[arch]
    match = _BLOCK_NAME.fullmatch(name)
    if match:
        module = table.get(match[2])
        return f"model.layers.{match[1]}.{module}.weight" if module else None
    stem = name.removesuffix(".weight")
    return f"{_GLOBAL[stem]}.weight" if stem != name and stem in _GLOBAL else None


def permuted_heads(name: str, arch: str, n_head: int, n_head_kv: int) -> int | None:
    """The head count the converter permuted GGUF tensor ``name``'s rows by, or None."""
    if arch not in PERMUTED:
        return None
    match = _BLOCK_NAME.fullmatch(name)
    if match and match[2] == "attn_q":
        return n_head
    if match and match[2] == "attn_k":
        return n_head_kv
    return None


def unpermute(w: np.ndarray, n_head: int, key: str) -> np.ndarray:
    """The inverse of ``LlamaModel.permute``: rows back in the Hugging Face order."""
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise InputError(f"{key}: {rows} rows do not split into {n_head} rotary heads of even size "
                         "(the GGUF's attention.head_count does not fit the tensor)")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
