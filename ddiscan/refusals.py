"""The adapter methods DDI does not apply to, and why (SPEC.md §10).

DDI scores a low-rank additive update ΔW of a base weight. These methods train something
else — a rescaling or a rotation of W0, prompt vectors, full small weights — so they are
refused by name, with the reason, whether the name comes from ``peft_type`` or from the
tensors' keys.
"""

from __future__ import annotations

__all__ = ["NOT_LOW_RANK", "why_not"]

_ROTATION = ("rotates W0 (W = W0·Rᵀ, R orthogonal): its ΔW = W0·(Rᵀ − I) lies in W0's own column space, "
             "so DDI's deviation O is ~0 by construction")
_PROMPT = "trains virtual prompt or prefix vectors, with no update of any weight"

# peft_type (upper case, as PEFT writes it) → why DDI does not apply
NOT_LOW_RANK = {
    "IA3": "IA3 scales W0's rows or columns by learned vectors (W0·diag(l)), with no low-rank update ΔW",
    "OFT": f"OFT {_ROTATION}",
    "BOFT": f"BOFT {_ROTATION}",
    "HRA": f"HRA (Householder reflections) {_ROTATION}",
    "PROMPT_TUNING": f"prompt tuning {_PROMPT}",
    "MULTITASK_PROMPT_TUNING": f"multitask prompt tuning {_PROMPT}",
    "P_TUNING": f"p-tuning {_PROMPT}",
    "PREFIX_TUNING": f"prefix tuning {_PROMPT}",
    "ADAPTION_PROMPT": f"adaption prompt {_PROMPT}",
    "CPT": f"context-aware prompt tuning {_PROMPT}",
    "LN_TUNING": "LN tuning trains LayerNorm weights in full, with no low-rank update",
    "TRAINABLE_TOKENS": "trainable tokens train embedding rows in full, with no low-rank update",
}


def why_not(method: str) -> str | None:
    """Why DDI does not apply to ``method`` (a peft_type, or a method's name as the key
    grammar gives it: "IA3", "OFT", "BOFT"), or None when nothing is known against it."""
    return NOT_LOW_RANK.get(str(method).upper())
