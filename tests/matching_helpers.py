"""Helpers shared by the tests of matching (test_matching, test_scaling, test_basekeys,
test_adapter): match an adapter to a base, and build PEFT / kohya keys with numpy."""

from __future__ import annotations

import numpy as np

import ddiscan
import ddiscan.lora
from ddiscan.io import TensorIndex

from safetensors_builders import lora_pair, rng


def match(base, adapter, **kwargs):
    return ddiscan.lora.match_modules(ddiscan.lora.load_adapter(adapter), TensorIndex(base), **kwargs)


def by_name(modules):
    return {m.name: m for m in modules}


def peft_keys(name: str, d: int, k: int, r: int, *, seed: int = 0, prefix: str = "base_model.model.") -> dict:
    a, b = lora_pair(d, k, r, seed=seed)
    return {f"{prefix}{name}.lora_A.weight": a, f"{prefix}{name}.lora_B.weight": b}


def kohya_keys(name: str, d: int, k: int, r: int, *, alpha: float | None = None, seed: int = 0) -> dict:
    a, b = lora_pair(d, k, r, seed=seed)
    tensors = {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b}
    if alpha is not None:
        tensors[f"{name}.alpha"] = np.array(alpha, np.float32)
    return tensors


def weights(shapes: dict, *, seed: int = 5, dtype=np.float32) -> dict:
    g = rng(seed)
    return {key: g.standard_normal(shape).astype(dtype) for key, shape in shapes.items()}
