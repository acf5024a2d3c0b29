"""Which modules to prune: top-τ, θ on DDI, or θ_norm on DDI_norm (SPEC.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .report import ModuleScore, Report

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

    def describe(self) -> str:
        return {"top": "top {:g} by DDI", "theta": "DDI >= {:g}", "theta_norm": "DDI_norm >= {:g}"}[self.rule].format(
            self.value
        )


def select(modules, *, top: int | None = None, theta: float | None = None,
           theta_norm: float | None = None) -> Selection:
    """Select modules by exactly one rule.

    Modules are ranked by DDI, highest first, ties broken by module name, so the
    selection is deterministic; modules whose scores are not finite are never selected.

    Parameters
    ----------
    modules : sequence of ModuleScore
    top : int, optional
        The ``top`` modules with the largest DDI.
    theta : float, optional
        Every module with DDI ≥ ``theta``.
    theta_norm : float, optional
        Every module with DDI_norm ≥ ``theta_norm``.
    """
    rules = {"top": top, "theta": theta, "theta_norm": theta_norm}
    given = {k: v for k, v in rules.items() if v is not None}
    if len(given) != 1:
        raise UsageError("give exactly one of --top, --theta, --theta-norm")
    (rule, value), = given.items()
    if rule == "top" and value < 0:
        raise UsageError("--top must be non-negative")
    ranked = [m for m in Report.ranked(modules) if m.finite]
    if rule == "top":
        chosen = ranked[: int(value)]
    elif rule == "theta":
        chosen = [m for m in ranked if m.ddi >= value]
    else:
        chosen = [m for m in ranked if m.ddi_norm >= value]
    return Selection(rule, value, tuple(chosen))
