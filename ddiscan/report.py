"""The scan's result: a versioned report, its JSON form and its schema.

The JSON report's fields are documented in the README ("The JSON report") and fixed by
``report.schema.json``, which ships in the package; ``schema_version`` changes whenever a
field's meaning does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources

import numpy as np

from .score import SCORES, ModuleScore, score, suspicion

__all__ = ["SCHEMA_VERSION", "ModuleScore", "Report", "summarize", "SCORES", "score", "suspicion", "load_schema"]

SCHEMA_VERSION = 1


def summarize(scores) -> dict:
    """Count, non-finite count, and min / quartiles / max of DDI over finite modules."""
    values = np.array([s.ddi for s in scores if s.finite and s.ddi is not None], dtype=np.float64)
    summary = {"modules": len(scores), "non_finite": sum(not s.finite for s in scores), "ddi": None}
    if values.size:
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        summary["ddi"] = {
            "min": float(values.min()), "q1": float(q1), "median": float(median),
            "q3": float(q3), "max": float(values.max()),
        }
    return summary


@dataclass
class Report:
    """A scan's full result; ``to_dict`` is the JSON report."""

    schema_version: int
    ddiscan_version: str
    method: str
    inputs: dict
    parameters: dict
    modules: list[ModuleScore]
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @staticmethod
    def ranked(scores, method: str = "ddi") -> list[ModuleScore]:
        """Most suspect first — highest DDI, lowest SafeLoRA cosine, highest E-DIEM — ties
        by name; non-finite modules last."""
        return sorted(scores, key=lambda s: (not s.finite, -suspicion(s, method), s.name))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modules"] = [
            dict(asdict(m), rank=i + 1 if m.finite else None) for i, m in enumerate(self.modules)
        ]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        names = {f.name for f in fields(ModuleScore)}
        modules = [ModuleScore(**{k: v for k, v in m.items() if k in names}) for m in data["modules"]]
        own = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in own}, "modules": modules})


def load_schema() -> dict:
    """The JSON Schema every report validates against."""
    return json.loads(resources.files("ddiscan").joinpath("report.schema.json").read_text(encoding="utf-8"))
