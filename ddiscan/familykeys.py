"""The key grammars of the adapter families beside plain LoRA: MLX-LM (``<module>.lora_a`` in × r,
``<module>.lora_b`` r × out, DoRA's ``<module>.m``), PEFT's VeRA (``vera_lambda_b`` / ``vera_lambda_d``,
shared ``vera_A`` / ``vera_B``) and LoHa / LoKr (PEFT's and LyCORIS's ``hada_*`` / ``lokr_*``), and the
:class:`Slot` every grammar of :mod:`ddiscan.grammars` reads a key into (SPEC.md §8, §9, §11)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PEFT_PREFIX", "KOHYA_PREFIXES", "Skipped", "Slot", "STRUCTURED", "STRUCTURED_NEEDS", "MLX_EMBEDDINGS",
           "mlx_slot", "vera_slot", "structured_slot", "mlx_transposed"]

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_", "lora_",
                  "lycoris_")


@dataclass(frozen=True)
class Skipped:
    """An adapter tensor that is not part of a LoRA pair, and why it was passed over."""

    key: str
    reason: str


@dataclass(frozen=True)
class Slot:
    """What one key's name says it is: ``slot`` of module ``name``, in ``style``'s layout."""

    name: str
    slot: str
    style: str | None = None
    adapter_name: str | None = None
    embedding: bool = False


# LoHa's and LoKr's tensors (PEFT's LoHaConfig/LoKrConfig and LyCORIS): <module>.<part>[.<adapter>]
STRUCTURED = {**{f"hada_{p}": "loha" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
              **{f"lokr_{p}": "lokr" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}}
# what a complete module holds: one of each tuple (the Tucker cores are checked with the shapes)
STRUCTURED_NEEDS = {"loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
                    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w1", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a"),
                             ("lokr_w2", "lokr_w2_b"))}
# PEFT's VeRA (ddiscan.vera): per module <path>.vera_lambda_b / vera_lambda_d, shared base_model.vera_A / vera_B
VERA_PARTS = {"vera_lambda_b": "up", "vera_lambda_d": "down"}
VERA_SHARED = ("vera_A", "vera_B")
# mlx-lm's LoRALinear (mlx_lm/tuner/lora.py): <module>.lora_a (in × r), <module>.lora_b (r × out), transposed
# against PEFT; its LoRAEmbedding: lora_a (num_embeddings × r), lora_b (r × dims), ΔW = s·lora_a·lora_b as stored
MLX_FACTORS = ("lora_a", "lora_b")
# the module names mlx-lm's models give an nn.Embedding (the only modules it wraps in LoRAEmbedding)
MLX_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def mlx_slot(parts: list[str], mlx_modules: set[str]) -> Slot | None:
    """mlx-lm's ``<module>.lora_a`` / ``<module>.lora_b`` and DoRA's ``<module>.m`` (beside a
    lora_a). A Linear's factors are transposed against PEFT's (lora_a is downᵀ, lora_b upᵀ);
    an embedding's are not (lora_a is up, lora_b down): :func:`mlx_transposed`."""
    if len(parts) < 2:
        return None
    name = ".".join(parts[:-1])
    if parts[-1] == "m" and name in mlx_modules:
        return Slot(name, "dora")
    if parts[-1] not in MLX_FACTORS:
        return None
    embedding = parts[-2] in MLX_EMBEDDINGS
    down = (parts[-1] == "lora_a") != embedding
    return Slot(name, "down" if down else "up", "mlx", embedding=embedding)


def vera_slot(parts: list[str]) -> Slot | Skipped | None:
    """VeRA's ``[base_model.model.]<path>.vera_lambda_b[.<adapter>]`` (up) and ``vera_lambda_d``
    (down); its shared ``base_model.vera_A`` / ``vera_B``, read with each module, as skipped."""
    found = next((i for i in (len(parts) - 1, len(parts) - 2) if i >= 0 and parts[i] in (*VERA_PARTS, *VERA_SHARED)),
                 None)
    if found is None:
        return None
    if parts[found] in VERA_SHARED:
        return Skipped(".".join(parts), "VeRA's shared projection (read with each module)")
    adapter_name = parts[found + 1] if found + 1 < len(parts) else None
    name = ".".join(parts[:found]).removeprefix(PEFT_PREFIX)
    return Slot(name, VERA_PARTS[parts[found]], "vera", adapter_name) if name else None


def mlx_transposed(pair) -> bool:
    """Whether ``pair``'s factor tensors are stored transposed (an MLX-LM Linear's)."""
    return pair.style == "mlx" and not pair.embedding


def structured_slot(key: str, parts: list[str]) -> Slot | None:
    """``[base_model.model.]<path>.hada_w1_a[.<adapter>]`` (PEFT) or ``lycoris_<path>.lokr_w1`` /
    ``lora_unet_<path>.hada_t1`` (LyCORIS, kohya-style names)"""
    found = next((i for i in (len(parts) - 1, len(parts) - 2) if i >= 1 and parts[i] in STRUCTURED), None)
    if found is None:
        return None
    name = ".".join(parts[:found]).removeprefix(PEFT_PREFIX)
    style = "kohya" if name.startswith(KOHYA_PREFIXES) and not key.startswith(PEFT_PREFIX) else "peft"
    adapter_name = parts[found + 1] if found + 1 < len(parts) and parts[found + 1] != "weight" else None
    return Slot(name, parts[found], style, adapter_name)
