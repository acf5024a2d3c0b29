"""ddiscan: score LoRA adapters by the Directional Deviation Index, from the weights alone.

>>> import ddiscan
>>> report = ddiscan.scan("base.safetensors", "adapter_dir/")      # doctest: +SKIP
>>> report.modules[0].name, report.modules[0].ddi                  # doctest: +SKIP

What a Python user needs is here: the scans, the audit, the check, the pruning, the selection, the
offline base lookup, profiles, the report types, the options and every error class. The
stages behind them (reading adapters, matching their keys to base weights, the kernels)
stay importable from their modules (``ddiscan.lora``, ``ddiscan.spectral``, ...).
"""

from ._version import __version__
from .auditing.run import AuditResult, audit
from .check import CheckResult, Failure, check
from .errors import (DdiscanError, HeaderError, InputError, MatchError, NoLoraPairs, NotSafetensors, OutputError,
                     PickleRefused, QuantizedBase, ShapeMismatch, UnsupportedDtype, UsageError)
from .locate import Located, find_base
from .options import OptionError, ScanOptions
from .profile import Profile, build_profile
from .prune import PruneResult, prune
from .render import render
from .report import ModuleScore, Report, load_schema
from .scan import scan, scan_many
from .select import Selection, select

__all__ = [
    "__version__",
    "scan",
    "scan_many",
    "audit",
    "check",
    "prune",
    "select",
    "find_base",
    "build_profile",
    "render",
    "load_schema",
    "ScanOptions",
    "Report",
    "ModuleScore",
    "Selection",
    "PruneResult",
    "CheckResult",
    "Failure",
    "Located",
    "Profile",
    "AuditResult",
    "DdiscanError",
    "UsageError",
    "OptionError",
    "InputError",
    "NotSafetensors",
    "PickleRefused",
    "HeaderError",
    "UnsupportedDtype",
    "QuantizedBase",
    "NoLoraPairs",
    "MatchError",
    "ShapeMismatch",
    "OutputError",
]
