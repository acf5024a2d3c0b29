"""Which modules to prune: top-τ, θ on DDI, or θ_norm on DDI_norm (SPEC.md §4) — or, for
the other methods, the lowest SafeLoRA cosines and the highest E-DIEM scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .options import OptionError
from .report import SCORES, ModuleScore, Report, score

__all__ = ["Selection", "select", "ddi_bounds", "undetermined", "undetermined_at_cut"]


@dataclass(frozen=True)
class Selection:
    """The modules a rule selects, in rank order, and the rule that selected them."""

    rule: str  # "top", "theta" or "theta_norm"
    value: float
    modules: tuple[ModuleScore, ...]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    method: str = "ddi"

    def describe(self) -> str:
        _, label, low = SCORES[self.method]
        if self.rule == "top":
            return f"top {self.value:g} by {label}"
        if self.rule == "theta_norm":
            return f"DDI_norm >= {self.value:g}"
        return f"{label} {'<=' if low else '>='} {self.value:g}"


def select(modules, *, top: int | None = None, theta: float | None = None,
           theta_norm: float | None = None, method: str = "ddi") -> Selection:
    """Select modules by exactly one rule.

    Modules are ranked most suspect first — highest DDI, lowest SafeLoRA cosine (SafeLoRA's
    own lowest-k rule), highest E-DIEM — ties broken by module name, so the selection is
    deterministic; modules whose scores are not finite are never selected.

    Parameters
    ----------
    modules : sequence of ModuleScore
    top : int, optional
        The ``top`` modules with the largest DDI.
    theta : float, optional
        Every module with DDI ≥ ``theta`` (cosine ≤ ``theta`` for SafeLoRA, E-DIEM ≥
        ``theta`` for SPLoRA).
    theta_norm : float, optional
        Every module with DDI_norm ≥ ``theta_norm`` (DDI only).
    method : {"ddi", "safelora", "splora"}
    """
    rule, value = _rule(method, top=top, theta=theta, theta_norm=theta_norm)
    ranked = [m for m in Report.ranked(modules, method) if m.finite]
    return Selection(rule, value, tuple(_chosen(ranked, rule, value, method)), method)


def _rule(method: str, **rules) -> tuple[str, float]:
    """The one rule given, and its value, or the OptionError that says what is wrong."""
    given = {k: v for k, v in rules.items() if v is not None}
    if len(given) != 1:
        raise OptionError("give exactly one of {top}, {theta}, {theta_norm}", "top", "theta", "theta_norm")
    (rule, value), = given.items()
    if rule == "top" and value < 0:
        raise OptionError("{top} must be non-negative", "top")
    if rule == "theta_norm" and method != "ddi":
        raise OptionError("{theta_norm} selects on DDI_norm; use {theta} or {top} with this method",
                          "theta_norm", "theta", "top")
    return rule, value


def _chosen(ranked: list[ModuleScore], rule: str, value: float, method: str) -> list[ModuleScore]:
    if rule == "top":
        return ranked[: int(value)]
    if rule == "theta_norm":
        return [m for m in ranked if m.ddi_norm >= value]
    if SCORES[method][2]:  # a low score is suspect (SafeLoRA's cosine)
        return [m for m in ranked if score(m, method) <= value]
    return [m for m in ranked if score(m, method) >= value]


def ddi_bounds(m: ModuleScore) -> tuple[float, float]:
    """DDI's interval from O's error bar (DDI is proportional to O): (DDI, DDI) when the
    error bar is 0 or not known (a profile's subspaces)."""
    error, o = m.deviation_error, m.deviation
    if not error or m.ddi is None or o is None:
        return (m.ddi, m.ddi) if m.ddi is not None else (0.0, 0.0)
    low, high = max(0.0, o - error), min(1.0, o + error)
    if o == 0:
        return 0.0, m.ddi + error
    return m.ddi * low / o, m.ddi * high / o


def undetermined(ranked) -> list[ModuleScore]:
    """The finite modules (ranked by DDI) whose DDI interval overlaps a rank neighbour's:
    their O is not precise enough to order them."""
    finite = [m for m in ranked if m.finite]
    bounds = [ddi_bounds(m) for m in finite]
    return [m for i, m in enumerate(finite)
            if (i > 0 and bounds[i][1] > bounds[i - 1][0]) or (i + 1 < len(finite) and bounds[i][0] < bounds[i + 1][1])]


def undetermined_at_cut(selection: Selection, modules) -> list[ModuleScore]:
    """The modules, selected or not, that the cut of a DDI selection could place on the other
    side within their error bars (empty for the other methods)."""
    if selection.method != "ddi":
        return []
    finite = [m for m in Report.ranked(modules) if m.finite]
    if selection.rule == "top":
        return _across_top(finite, {m.name for m in selection.modules})
    cut = selection.value
    if selection.rule == "theta_norm":  # DDI_norm = DDI / (1 + DDI) >= v  ⇔  DDI >= v / (1 − v)
        cut = selection.value / (1 - selection.value) if selection.value < 1 else math.inf
    return [m for m in finite if ddi_bounds(m)[0] < cut <= ddi_bounds(m)[1]]


def _across_top(finite, chosen: set) -> list[ModuleScore]:
    """Selected modules whose DDI could fall below an unselected one's, and the reverse."""
    bounds = {m.name: ddi_bounds(m) for m in finite}
    floor = min((bounds[n][0] for n in chosen), default=math.inf)
    ceiling = max((bounds[m.name][1] for m in finite if m.name not in chosen), default=-math.inf)
    return [m for m in finite if (bounds[m.name][0] < ceiling if m.name in chosen else bounds[m.name][1] > floor)]
