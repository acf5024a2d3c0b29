"""Where the scan's base weights come from: one :class:`WeightSource` interface and one
file per kind of base. A new kind of base is a new module here with a class that has an
``accept(base, sketch)`` classmethod, and one line in :data:`KINDS`."""

from __future__ import annotations

from ..sketch import Sketch
from .alignment import AlignmentDifference, alignment_update
from .base import WeightSource
from .checkpoint import CheckpointSource
from .gguf import GGUFSource
from .profile import ProfileSource
from .quantized import QuantizedSource

__all__ = ["WeightSource", "KINDS", "open_source", "AlignmentDifference", "alignment_update",
           "CheckpointSource", "ProfileSource", "GGUFSource", "QuantizedSource"]

# tried in order: the first whose accept() returns a source opens the base
KINDS = (
    ProfileSource,
    GGUFSource,
    QuantizedSource,
    CheckpointSource,  # accepts any base: keep it last
)


def open_source(base, *, sketch: Sketch, aligned=None, unaligned=None) -> WeightSource:
    """The source of a scan's base weights: ``base`` itself, or, given the aligned and
    unaligned checkpoints, their difference over ``base``'s keys."""
    source = next(s for s in (kind.accept(base, sketch) for kind in KINDS) if s is not None)
    if aligned is None:
        return source
    return AlignmentDifference(source, aligned, unaligned, sketch)
