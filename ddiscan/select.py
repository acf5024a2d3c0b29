"""Which modules to prune: top-τ, θ on DDI, or θ_norm on DDI_norm (SPEC.md §4) — or, for
the other methods, the lowest SafeLoRA cosines and the highest E-DIEM scores."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .report import SCORES, ModuleScore, Report, score

__all__ = ["Selection", "select"]


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
    rules = {"top": top, "theta": theta, "theta_norm": theta_norm}
    given = {k: v for k, v in rules.items() if v is not None}
    if len(given) != 1:
        raise UsageError("give exactly one of --top, --theta, --theta-norm")
    (rule, value), = given.items()
    if rule == "top" and value < 0:
        raise UsageError("--top must be non-negative")
    if rule == "theta_norm" and method != "ddi":
        raise UsageError("--theta-norm selects on DDI_norm; use --theta or --top with this method")
    ranked = [m for m in Report.ranked(modules, method) if m.finite]
    if rule == "top":
        chosen = ranked[: int(value)]
    elif rule == "theta_norm":
        chosen = [m for m in ranked if m.ddi_norm >= value]
    elif SCORES[method][2]:
        chosen = [m for m in ranked if score(m, method) <= value]
    else:
        chosen = [m for m in ranked if score(m, method) >= value]
    return Selection(rule, value, tuple(chosen), method)
