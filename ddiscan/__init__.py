"""ddiscan: score LoRA adapters by the Directional Deviation Index, from the weights alone.

>>> import ddiscan
>>> report = ddiscan.scan("base.safetensors", "adapter_dir/")      # doctest: +SKIP
>>> report.modules[0].name, report.modules[0].ddi                  # doctest: +SKIP
"""

from ._version import __version__
from .errors import DdiscanError, InputError, OutputError, UsageError
from .lora import LoraModule, load_adapter, match_modules
from .render import render
from .report import ModuleScore, Report, load_schema
from .prune import prune
from .profile import Profile, build_profile
from .scan import scan, scan_many

__all__ = [
    "__version__",
    "scan",
    "scan_many",
    "prune",
    "build_profile",
    "Profile",
    "Report",
    "ModuleScore",
    "LoraModule",
    "load_adapter",
    "match_modules",
    "load_schema",
    "render",
    "DdiscanError",
    "UsageError",
    "InputError",
    "OutputError",
]
