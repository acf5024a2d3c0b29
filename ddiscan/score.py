"""Every score ddiscan computes for a module: :class:`ModuleScore`, and one table of the
methods (the field each ranks by, its label, whether low values are the suspect ones,
and its scorer). Each scorer adapts a kernel — DDI (:mod:`ddiscan.spectral`), SafeLoRA
(:mod:`ddiscan.safelora`), E-DIEM (:mod:`ddiscan.ediem`) — to one signature::

    scorer(module, up, down, weight, *, t, options, xp) -> ModuleScore

``up`` (d × r) and ``down`` (r × k) are float64 arrays of namespace ``xp``; ``weight``
offers ``norm`` (‖W‖_F), ``oriented(module)`` (W as d × k) and ``basis(module, t)`` (Q_t),
the last two computed only when asked; ``options`` is the scan's ScanOptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from . import spectral, structured
from .ediem import ediem_score
from .errors import InputError
from .safelora import safelora_score

__all__ = ["ModuleScore", "Method", "METHOD_TABLE", "SCORES", "score", "suspicion", "COMPONENTS",
           "parse_components", "components"]

COMPONENTS = ("S", "O", "M")


@dataclass(frozen=True)
class ModuleScore:
    """The scores of one LoRA-updated module (SPEC.md §2–3). Scores are None when ``finite``
    is False (NaN or Inf in the module's tensors)."""

    name: str
    base_key: str
    kind: str
    block: int | None
    layout: str
    d: int
    k: int
    r: int
    t: int
    scale: float | None
    scale_source: str
    transposed: bool
    dora: bool
    finite: bool
    sharpness: float | None = None
    deviation: float | None = None
    magnitude: float | None = None
    magnitude_norm: float | None = None
    ddi: float | None = None
    ddi_raw: float | None = None
    ddi_norm: float | None = None
    delta_norm: float | None = None
    base_norm: float | None = None
    cosine: float | None = None
    ediem: float | None = None
    core: str = "lora"  # what scored ΔW: "lora", "khatri-rao" (LoHa), "kronecker" (LoKr) or "dense"
    quantization: dict | None = None  # how W0 was dequantized (ddiscan/io/quant.py), None if stored plain
    gap: float | None = None
    deviation_error: float | None = None


def score_ddi(module, up, down, weight, *, t: int, options, xp) -> ModuleScore:
    """DDI = S · O · M_norm (M with ``magnitude="raw"``), SPEC.md §2–3; with
    ``options.components``, the product of those components (§3, the ablation)."""
    fields = _fields(module, t)
    if not _finite_inputs(module, up, down, weight.norm, xp):
        return ModuleScore(**fields, finite=False)
    base_norm = weight.norm
    subspace = weight.basis(module, t)
    spectrum, dev = _spectrum_deviation(module, up, down, subspace.basis, xp)
    delta_norm = _finite_norm(module, spectrum)
    sharp = spectral.sharpness(spectrum)
    mag = spectral.magnitude(delta_norm, base_norm)
    mag_norm = spectral.magnitude_norm(delta_norm, base_norm)
    ddi_raw = sharp * dev * mag
    chosen = mag if options.magnitude == "raw" else mag_norm
    ddi = sharp * dev * chosen if options.components is None else components(
        options.components, sharpness=sharp, deviation=dev, magnitude=chosen)
    return ModuleScore(
        **fields, finite=True, sharpness=sharp, deviation=dev, magnitude=mag, magnitude_norm=mag_norm,
        ddi=ddi, ddi_raw=ddi_raw, ddi_norm=ddi / (1.0 + ddi), delta_norm=delta_norm, base_norm=base_norm,
        gap=subspace.gap, deviation_error=subspace.error,
    )


def _spectrum_deviation(module, up, down, basis, xp) -> tuple[spectral.Spectrum, float]:
    """ΔW's spectrum and O through the module's core: LoKr's two Kronecker factors
    (:mod:`ddiscan.structured`, ``up`` a Kron), or the r × r core of up · down."""
    if isinstance(up, structured.Kron):
        spectrum = structured.kron_spectrum(up, module.scale, xp=xp)
        return spectrum.whole, structured.kron_deviation(basis, up, spectrum, xp=xp)
    spectrum = spectral.update_spectrum(up, down, module.scale, xp=xp)
    return spectrum, spectral.deviation(basis, up, spectrum, module.scale, xp=xp)


def score_safelora(module, up, down, weight, *, t: int, options, xp) -> ModuleScore:
    """SafeLoRA's cosine (SPEC.md §7.1); ``weight`` is the alignment update A."""
    return _alignment_score(module, up, down, weight, t, xp, "cosine", lambda diff: safelora_score(
        diff, up, down, module.scale, diff_norm=weight.norm, xp=xp).cosine)


def score_ediem(module, up, down, weight, *, t: int, options, xp) -> ModuleScore:
    """SPLoRA's E-DIEM (SPEC.md §7.2); ``weight`` is the alignment update A."""
    return _alignment_score(module, up, down, weight, t, xp, "ediem", lambda diff: ediem_score(
        diff, up, down, module.scale, diff_norm=weight.norm, samples=options.samples, seed=options.seed,
        xp=xp).score)


def _alignment_score(module, up, down, weight, t, xp, field: str, kernel) -> ModuleScore:
    fields = _fields(module, t)
    diff = weight.oriented(module)
    if not _finite_inputs(module, up, down, weight.norm, xp):
        return ModuleScore(**fields, finite=False)
    spectrum = spectral.update_spectrum(up, down, module.scale, xp=xp)
    common = dict(sharpness=spectral.sharpness(spectrum), delta_norm=_finite_norm(module, spectrum))
    value = kernel(diff)
    return ModuleScore(**fields, finite=math.isfinite(value), **{field: value}, **common)


def _fields(module, t: int) -> dict:
    return dict(
        name=module.name, base_key=module.base_key, kind=module.kind, block=module.block,
        layout=module.layout, d=module.d, k=module.k, r=module.r, t=t,
        scale=module.scale if math.isfinite(module.scale) else None,  # a NaN/Inf .alpha or lora_alpha
        scale_source=module.scale_source, transposed=module.transpose_base, dora=module.dora_key is not None,
        core=module.core,
    )


def _finite_norm(module, spectrum) -> float:
    """‖ΔW‖_F, or InputError when finite factors and scale make an update beyond float64."""
    norm = spectrum.norm
    if not math.isfinite(norm):
        raise InputError(f"{module.name}: ‖ΔW‖_F = ‖s · B · A‖_F exceeds the float64 range "
                         f"(scale {module.scale:g}); the factors or the scaling are corrupt")
    return norm


def _finite_inputs(module, up, down, norm: float, xp) -> bool:
    """Whether the scale, the factors and the weight's norm are all finite (NaN/Inf is
    reported as a non-finite module, not an error)."""
    if isinstance(up, structured.Kron):
        return math.isfinite(module.scale) and math.isfinite(norm) and up.finite(xp)
    return (math.isfinite(module.scale) and math.isfinite(norm)
            and bool(xp.all(xp.isfinite(up))) and bool(xp.all(xp.isfinite(down))))


@dataclass(frozen=True)
class Method:
    """A scoring method: the ModuleScore field it ranks by, its label, whether low values
    (rather than high) are the suspect ones, and its scorer."""

    field: str
    label: str
    low_suspect: bool
    scorer: Callable


METHOD_TABLE = {
    "ddi": Method("ddi", "DDI", False, score_ddi),
    "safelora": Method("cosine", "cosine", True, score_safelora),
    "splora": Method("ediem", "E-DIEM", False, score_ediem),
}
# the table as (field, label, low_suspect), as report.SCORES has always given it
SCORES = {name: (m.field, m.label, m.low_suspect) for name, m in METHOD_TABLE.items()}


def score(m: ModuleScore, method: str = "ddi") -> float | None:
    """The method's own score of a module (DDI, SafeLoRA's cosine, E-DIEM)."""
    return getattr(m, SCORES[method][0])


def suspicion(m: ModuleScore, method: str = "ddi") -> float:
    """The number a method ranks by, larger = more suspect (0 when not finite)."""
    if not m.finite:
        return 0.0
    return -score(m, method) if SCORES[method][2] else score(m, method)


# ---------------------------------------------------------------------------------------
# DDI's component ablation (SPEC.md §3)


def parse_components(text: str) -> tuple[str, ...]:
    """``"S,O"`` → ``("S", "O")``: a non-empty subset of S, O, M in canonical order.

    Case-insensitive; ``+`` and spaces separate too. Raises ValueError on an unknown,
    repeated or missing letter.
    """
    parts = [p for p in text.replace("+", ",").replace(" ", ",").upper().split(",") if p]
    if not parts:
        raise ValueError("give at least one of S, O, M")
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}: choose from S, O, M")
    if len(set(parts)) != len(parts):
        raise ValueError("a component is repeated")
    return tuple(c for c in COMPONENTS if c in parts)


def components(subset: Iterable[str], *, sharpness: float, deviation: float, magnitude: float) -> float:
    """DDI's ablation score: the product of the chosen components (the DDI paper's ablation, SPEC.md §3).

    Parameters
    ----------
    subset : iterable of "S", "O", "M"
        Non-empty; ``{"S", "O", "M"}`` gives DDI itself.
    sharpness, deviation : float
        S and O (:mod:`ddiscan.spectral`).
    magnitude : float
        M_norm (DDI's default) or raw M, whichever the scan uses for "M".
    """
    chosen = set(subset)
    if not chosen:
        raise ValueError("give at least one of S, O, M")
    if not chosen <= set(COMPONENTS):
        raise ValueError(f"unknown component {sorted(chosen - set(COMPONENTS))[0]!r}: choose from S, O, M")
    values = {"S": sharpness, "O": deviation, "M": magnitude}
    product = 1.0
    for c in COMPONENTS:
        if c in chosen:
            product *= values[c]
    return product
