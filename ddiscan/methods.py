"""The scorers of the DDI paper's comparison, under the names they had before each got its
own module: SafeLoRA (:mod:`ddiscan.safelora`), SPLoRA's E-DIEM (:mod:`ddiscan.ediem`) and
DDI's component ablation (:mod:`ddiscan.score`). SPEC.md §7 derives them."""

from .ediem import EDiemScore, ediem_score, reference_probes
from .safelora import SafeLoraScore, project_up, safelora_score
from .score import COMPONENTS, components, parse_components

__all__ = ["SafeLoraScore", "EDiemScore", "project_up", "safelora_score", "ediem_score", "reference_probes",
           "COMPONENTS", "parse_components", "components"]
