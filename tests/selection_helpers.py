"""Shared by the selection tests: ModuleScores from bare scores, and the public SafeLoRA
code's lowest-k rule."""

import numpy as np

from ddiscan.score import SCORES, ModuleScore
from ddiscan.select import select


def public_lowest_k(cosines, k):
    """The public SafeLoRA code's 'number' rule: thrs = sort(cos)[:k][-1]; project cos <= thrs."""
    thrs = np.sort(cosines)[:k][-1]
    return [i for i, c in enumerate(cosines) if c <= thrs]


def scored(name, **score):
    return ModuleScore(name=name, base_key=f"{name}.weight", kind="q_proj", block=0, layout="linear", d=4, k=4,
                       r=1, t=1, scale=1.0, scale_source="default", transposed=False, dora=False, finite=True,
                       **score)


def ranked(values: dict, method: str, top: int | None = None) -> list[str]:
    """The names :func:`ddiscan.select.select` picks from ``{name: score}``, most suspect first."""
    field = SCORES[method][0]
    modules = [scored(n, **{field: v}) for n, v in values.items()]
    return select(modules, top=len(modules) if top is None else top, method=method).names
