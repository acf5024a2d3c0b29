"""The key grammars of LoRA adapters: which tensor of a file is which factor of which module.

Six layouts are told apart by the key names alone (SPEC.md §1, §8, §9, §11; :mod:`ddiscan.lora`
lists them): PEFT (``<path>.lora_A[.<adapter>].weight`` …), kohya / sd-scripts
(``<name>.lora_down.weight`` …), diffusers before PEFT (``<path>.lora.down.weight``,
``<attn>.processor.to_q_lora.down.weight`` …), MLX-LM (``<module>.lora_a`` in × r,
``<module>.lora_b`` r × out, DoRA's ``<module>.m``), PEFT's VeRA (``vera_lambda_b`` /
``vera_lambda_d``, shared ``vera_A`` / ``vera_B``) and LoHa / LoKr (PEFT's and LyCORIS's ``hada_*`` /
``lokr_*``); the last three's slots are :mod:`ddiscan.familykeys`'. :func:`classify` groups a file's keys into
:class:`Pair` s and names every other tensor as skipped (no update) or unread (an update
ddiscan cannot read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import MatchError
from .io.reader import SafetensorsFile
from .familykeys import (KOHYA_PREFIXES, MLX_EMBEDDINGS, PEFT_PREFIX, STRUCTURED, STRUCTURED_NEEDS, Skipped, Slot,
                         mlx_slot, mlx_transposed, structured_slot, vera_slot)
from .refusals import why_not

__all__ = ["PEFT_PREFIX", "KOHYA_PREFIXES", "Skipped", "Pair", "classify", "unread_summary", "adapter_kind",
           "module_keys", "mlx_transposed", "MLX_EMBEDDINGS"]

_PEFT_PARTS = {"lora_A": "down", "lora_B": "up", "lora_embedding_A": "down", "lora_embedding_B": "up"}
# PEFT tensors beside the factors: DoRA's magnitude and AdaLoRA's singular values
_PEFT_EXTRAS = {"lora_magnitude_vector": "dora", "lora_E": "singular"}


@dataclass
class Pair:
    """The adapter keys of one LoRA module, gathered slot by slot from the key names."""

    name: str
    style: str | None = None  # "peft", "kohya", "diffusers" or "mlx", from the factor keys
    up: str | None = None
    down: str | None = None
    embedding: bool = False
    dora: str | None = None
    alpha: str | None = None
    singular: str | None = None  # AdaLoRA's lora_E
    bias: str | None = None  # lora_B.bias
    adapter_name: str | None = None
    family: str | None = None  # "loha" or "lokr": the update is in ``parts``, not up/down
    parts: dict[str, str] = field(default_factory=dict)  # LoHa/LoKr part (hada_w1_a …) → key

    @property
    def complete(self) -> bool:
        """Whether every factor of the update is here (LoRA: up and down; LoHa/LoKr: ``STRUCTURED_NEEDS``)."""
        if self.family is None:
            return bool(self.up and self.down)
        return all(any(part in self.parts for part in choice) for choice in STRUCTURED_NEEDS[self.family])

    @property
    def factor_keys(self) -> list[str]:
        """The tensors that carry the update: zeroing them all makes ΔW = 0."""
        return [k for k in (self.down, self.up, self.singular, self.bias, *self.parts.values()) if k]

    def assign(self, slot: str, key: str, style: str | None = None) -> None:
        if getattr(self, slot) is not None:
            raise MatchError(f"{key} and {getattr(self, slot)}: two {slot} tensors for LoRA module {self.name}")
        setattr(self, slot, key)
        if style is not None:
            if self.style not in (None, style):
                raise MatchError(f"{key}: LoRA module {self.name} mixes {self.style} and {style} keys")
            self.style = style

    def add(self, slot: Slot, key: str) -> None:
        self.adapter_name = self.adapter_name or slot.adapter_name
        if slot.slot in STRUCTURED:
            self.add_part(slot, key)
            return
        if self.family is not None and slot.slot in ("up", "down"):
            raise MatchError(f"{key}: module {self.name} mixes LoRA and {self.family} tensors")
        self.assign(slot.slot, key, slot.style)
        self.embedding = self.embedding or slot.embedding

    def add_part(self, slot: Slot, key: str) -> None:
        """A LoHa/LoKr tensor: one per part, one family and one key layout per module."""
        family = STRUCTURED[slot.slot]
        if self.up or self.down:
            raise MatchError(f"{key}: module {self.name} mixes LoRA and {family} tensors")
        if slot.slot in self.parts:
            raise MatchError(f"{key} and {self.parts[slot.slot]}: two {slot.slot} tensors for module {self.name}")
        if self.family not in (None, family):
            raise MatchError(f"{key}: module {self.name} mixes {self.family} and {family} tensors")
        if self.style not in (None, slot.style):
            raise MatchError(f"{key}: module {self.name} mixes {self.style} and {slot.style} keys")
        self.family, self.style = family, slot.style
        self.parts[slot.slot] = key


# Key components that name a non-LoRA PEFT/LyCORIS method, by prefix (LoHa/LoKr: the parts
# not in STRUCTURED, such as LyCORIS's unused lokr_t1).
_ALGORITHMS = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("boft_", "BOFT"), ("oft_", "OFT"), ("ia3_", "IA3"))
# "lora" as a word of a key component: lora_A, lora_down, lora_unet_…, to_q_lora, lora_linear_layer
_LORA_WORD = re.compile(r"(?:^|_)lora(?:_|$)", re.IGNORECASE)
# diffusers' attention-processor LoRA (LoRAAttnProcessor): <attn>.processor.to_q_lora.down.weight
_PROCESSOR_FACTOR = re.compile(r"to_(q|k|v|out)_lora")


def _algorithm(parts: list[str]) -> str | None:
    for part in parts:
        for prefix, name in _ALGORITHMS:
            if part.startswith(prefix):
                return name
    return None


def _diffusers_module(stem: list[str]) -> list[str] | None:
    """The module path of a pre-PEFT diffusers LoRA factor (key without ``.down.weight``),
    or None when ``stem`` is not in that layout."""
    *path, last = stem
    if not path:
        return None
    if last in ("lora", "lora_linear_layer"):
        return path
    match = _PROCESSOR_FACTOR.fullmatch(last)
    if match is None:
        return None
    if path[-1] == "processor":
        path = path[:-1]
    return path + (["to_out", "0"] if match.group(1) == "out" else [f"to_{match.group(1)}"])


def _legit_skip(key: str, parts: list[str]) -> str | None:
    """Why a tensor that is no LoRA factor is passed over, or None when it carries an update
    ddiscan cannot read."""
    if "trainable_tokens" in key or "token_adapter" in key:
        return "trainable tokens"
    if ".base_layer." in key:
        return "full weight (base layer saved by PEFT)"
    if "modules_to_save" in key:
        return "full weight (modules_to_save)"
    if any(_LORA_WORD.search(part) for part in parts):
        return None
    if parts[-1] == "bias":
        return "bias"
    if key.startswith(PEFT_PREFIX):
        return "full weight (modules_to_save)"
    return "not a LoRA tensor"


def _other_method(key: str, parts: list[str]) -> Skipped | None:
    """A tensor of another method (LoHa, LoKr, …), which ddiscan does not read."""
    algorithm = _algorithm(parts)
    if algorithm:
        why = why_not(algorithm)
        return Skipped(key, f"{algorithm} tensor (not LoRA; not supported{': ' + why if why else ' yet'})")
    return None


def _kohya_slot(parts: list[str]) -> Slot | None:
    """``<name>.lora_down.weight`` / ``<name>.lora_up.weight``"""
    if len(parts) >= 3 and parts[-2] in ("lora_down", "lora_up") and parts[-1] == "weight":
        return Slot(".".join(parts[:-2]), parts[-2].removeprefix("lora_"), "kohya")
    return None


def _diffusers_slot(parts: list[str]) -> Slot | None:
    """``<path>.lora.down.weight``, ``<attn>.processor.to_q_lora.up.weight`` …"""
    if len(parts) < 3 or parts[-2] not in ("down", "up") or parts[-1] != "weight":
        return None
    module = _diffusers_module(parts[:-2])
    return Slot(".".join(module), parts[-2], "diffusers") if module else None


def _scalar_slot(parts: list[str]) -> Slot | None:
    """kohya's and diffusers' ``<name>.alpha``, LyCORIS's ``<name>.dora_scale``"""
    if len(parts) < 2 or parts[-1] not in ("alpha", "dora_scale"):
        return None
    name = ".".join(_diffusers_module(parts[:-1]) or parts[:-1])
    return Slot(name, "alpha" if parts[-1] == "alpha" else "dora")


def _peft_slot(parts: list[str]) -> Slot | None:
    """``[base_model.model.]<path>.lora_A[.<adapter>].weight`` and its kin (lora_B.bias,
    lora_embedding_A/B, lora_magnitude_vector, lora_E)."""
    stem = parts[:-1] if parts[-1] in ("weight", "bias") else parts
    found = next((i for i in (len(stem) - 1, len(stem) - 2)
                  if i >= 1 and (stem[i] in _PEFT_PARTS or stem[i] in _PEFT_EXTRAS)), None)
    if found is None or (parts[-1] == "bias" and stem[found] != "lora_B"):
        return None
    part = stem[found]
    name = ".".join(stem[:found]).removeprefix(PEFT_PREFIX)
    adapter_name = stem[found + 1] if found + 1 < len(stem) else None
    if part in _PEFT_EXTRAS:
        return Slot(name, _PEFT_EXTRAS[part], adapter_name=adapter_name)
    if parts[-1] == "bias":
        return Slot(name, "bias", adapter_name=adapter_name)
    return Slot(name, _PEFT_PARTS[part], "peft", adapter_name, part.startswith("lora_embedding"))


def classify(keys) -> tuple[dict[str, Pair], list[Skipped], list[Skipped]]:
    """LoRA pairs by module name; tensors legitimately skipped; tensors with an update that
    ddiscan cannot read (unread)."""
    pairs: dict[str, Pair] = {}
    skipped: list[Skipped] = []
    unread: list[Skipped] = []
    keys = list(keys)
    mlx_modules = {key.removesuffix(".lora_a") for key in keys if key.endswith(".lora_a")}
    for key in keys:
        parts = key.split(".")
        structured = structured_slot(key, parts)
        if structured is not None:
            pairs.setdefault(structured.name, Pair(structured.name)).add(structured, key)
            continue
        other = _other_method(key, parts)
        if other is not None:
            unread.append(other)
            continue
        slot = vera_slot(parts)
        if isinstance(slot, Skipped):
            skipped.append(slot)
            continue
        slot = (slot or mlx_slot(parts, mlx_modules) or _kohya_slot(parts) or _diffusers_slot(parts)
                or _scalar_slot(parts) or _peft_slot(parts))
        if slot is not None:
            pairs.setdefault(slot.name, Pair(slot.name)).add(slot, key)
            continue
        reason = _legit_skip(key, parts)
        if reason is None:
            unread.append(Skipped(key, "LoRA-looking tensor in a layout ddiscan does not read"))
        else:
            skipped.append(Skipped(key, reason))
    return pairs, skipped, unread


def unread_summary(unread: list[Skipped]) -> str:
    """``12 tensors ddiscan cannot read (LoHa tensor …: 12): key, key and 10 more``"""
    counts: dict[str, int] = {}
    for s in unread:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    kinds = "; ".join(f"{reason}: {n}" for reason, n in counts.items())
    keys = [s.key for s in unread]
    listed = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"{len(keys)} tensor(s) ddiscan cannot read ({kinds}): {listed}"


def adapter_kind(keys) -> str | None:
    """What the key names alone say a file is: ``"adapter"`` when any key is named as an
    adapter's (a LoRA factor, a DoRA magnitude, another method's update tensor, PEFT's
    ``base_model.model.`` or kohya's ``lora_`` prefix), else None."""
    keys = list(keys)
    pairs, _, unread = classify(keys)
    if any(key.startswith((PEFT_PREFIX, *KOHYA_PREFIXES)) for key in keys) or unread:
        return "adapter"
    return "adapter" if any(p.up or p.down or p.dora or p.parts for p in pairs.values()) else None


def module_keys(file: SafetensorsFile) -> dict[str, dict[str, list[str]]]:
    """Each LoRA module's adapter keys: ``factors`` (A/B or down/up, AdaLoRA's lora_E and
    lora_B.bias, LoHa's hada_* and LoKr's lokr_* tensors: all that zeroing removes the module's
    update) and ``extra`` (DoRA magnitude, kohya/LyCORIS alpha), by module name, read from the
    key names alone (no base)."""
    pairs, _, _ = classify(file.keys())
    return {
        name: {"factors": p.factor_keys, "extra": [k for k in (p.dora, p.alpha) if k]}
        for name, p in pairs.items() if p.complete
    }
