"""Check adapters against limits on their scores: what ``ddiscan check`` (and pre-commit) runs.

:func:`check` finds the adapters among the paths it is given (passing over, with a note,
files that are not adapters), groups them by base (the one given, or each adapter's, found
offline), scans each group with one read of its base, and compares every module's scores
with the limits. :func:`base_groups` and :func:`scan_grouped` are the grouping and the scan,
for callers (``ddiscan report``) that want the reports themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io.reader import SafetensorsFile
from .locate import Located, find_base
from .lora import adapter_kind
from .options import OptionError, ScanOptions
from .profile import Profile, is_profile
from .report import Report
from .scan import scan_many

__all__ = ["check", "CheckResult", "Failure", "LIMITS", "base_groups", "scan_grouped", "adapter_of"]

# each limit: the score it bounds, its label, whether a value above it (True) or below it fails
LIMITS = {
    "max_ddi": ("ddi", "DDI", True),
    "max_ddi_norm": ("ddi_norm", "DDI_norm", True),
    "min_cosine": ("cosine", "cosine", False),
    "max_ediem": ("ediem", "E-DIEM", True),
}
# the limits that apply to each method's scores
_METHOD_LIMITS = {"ddi": ("max_ddi", "max_ddi_norm"), "safelora": ("min_cosine",), "splora": ("max_ediem",)}
_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt", "adapters.safetensors")


@dataclass(frozen=True)
class Failure:
    """One module over (or under) one limit; ``value`` None when the score is not finite."""

    file: str
    module: str
    label: str
    value: float | None
    limit: float
    above: bool

    def __str__(self) -> str:
        shown = "not finite" if self.value is None else f"{self.value:.6g}"
        return f"{self.file}:1: {self.module}: {self.label} {shown} {'>' if self.above else '<'} {self.limit:g}"


@dataclass(frozen=True)
class CheckResult:
    """The reports of the adapters checked, the failures, and notes (paths passed over,
    profiles used: their digest and the files they were made from)."""

    reports: list[Report]
    failures: list[Failure]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def modules(self) -> int:
        return sum(len(r.modules) for r in self.reports)


def check(adapters, *, base=None, max_ddi=None, max_ddi_norm=None, min_cosine=None, max_ediem=None,
          profiles=(), profile_sha256=None, **scan_options) -> CheckResult:
    """Scan ``adapters`` (paths: adapters, their files or adapter_config.json) against
    ``base`` (default: each adapter's, see :func:`ddiscan.find_base`) and compare each
    module's scores with the limits; at least one limit of the method must be given."""
    limits = {"max_ddi": max_ddi, "max_ddi_norm": max_ddi_norm, "min_cosine": min_cosine, "max_ediem": max_ediem}
    wanted = _METHOD_LIMITS.get(scan_options.get("method", "ddi"), ())
    if wanted and all(limits[name] is None for name in wanted):
        raise OptionError("give " + " and/or ".join("{%s}" % name for name in wanted), *wanted)
    ScanOptions(**scan_options)  # every option checked before any file is read
    targets, notes = check_targets(adapters)
    reports = []
    if targets:
        groups, _ = base_groups(base, targets, profiles)
        reports, used = scan_grouped(groups, profile_sha256=profile_sha256, **scan_options)
        notes += used
    failures = [f for r in reports for f in _failures(r, limits)]
    return CheckResult(reports, failures, notes)


def _failures(report: Report, limits: dict):
    where = report.inputs["adapter"]["file"]
    for m in report.modules:
        for name, limit in limits.items():
            score, label, above = LIMITS[name]
            value = getattr(m, score)
            if limit is None or (m.finite and value is None):
                continue
            if value is None or (value > limit if above else value < limit):
                yield Failure(where, m.name, label, value, limit, above)


def base_groups(base, adapters, profiles=()) -> tuple[dict[str, list], list[Located]]:
    """The adapters grouped by base: all with ``base`` when given, else by each one's base
    found offline; and where each was found (one per adapter, none when ``base`` is given)."""
    if base is not None:
        return {base: list(adapters)}, []
    located = [find_base(adapter, profiles=list(profiles) or None) for adapter in adapters]
    groups: dict = {}
    for adapter, found in zip(adapters, located):
        groups.setdefault(str(found.path), []).append(adapter)
    return groups, located


def scan_grouped(groups: dict, *, profile_sha256=None, **scan_options) -> tuple[list[Report], list[str]]:
    """The reports of :func:`base_groups`' adapters, in the order first given, each base
    read once for its group, and a note for each profile among the bases (verified,
    against ``profile_sha256`` when given)."""
    results, notes = {}, []
    for base, group in groups.items():
        source, note = _base_source(base, profile_sha256)
        notes += [note] if note else []
        for adapter, result in zip(group, scan_many(source, group, **scan_options)):
            results[adapter] = result
    order = dict.fromkeys(a for group in groups.values() for a in group)
    return [results[a] for a in order], notes


def _base_source(path, pin: str | None):
    """The base to scan (an opened, verified Profile for a profile, else the path) and,
    for a profile, a note of its digest and the files it was made from."""
    if is_profile(path):
        profile = Profile(path, sha256=pin)
        return profile, f"{path}: profile sha256 {profile.sha256}, made from {profile.vouches_for()}"
    if pin is not None:
        shown = str(path).replace("{", "{{").replace("}", "}}")
        raise OptionError("{profile_sha256} pins a base profile; %s is not a .ddiprofile file" % shown,
                          "profile_sha256")
    return path, None


def check_targets(paths) -> tuple[list[str], list[str]]:
    """The adapters among PATHS, each once, and a note for each path passed over."""
    targets, notes = [], []
    for path in paths:
        target, note = adapter_of(path)
        if note is None:
            targets.append(target)
        else:
            notes.append(note)
    return list(dict.fromkeys(targets)), notes


def adapter_of(path: str) -> tuple[str | None, str | None]:
    """The adapter a file belongs to (a PEFT directory for its config or weights file), or
    None and why the file is not one.

    A PEFT or MLX-LM directory (adapter_config.json and adapter weights) is always checked, and so is
    any file whose keys the reader takes for LoRA tensors, so that a broken adapter fails;
    only a file with no such key at all, or a config with no weights, is passed over.
    """
    p = Path(path)
    if p.name == "adapter_config.json":
        if any((p.parent / name).exists() for name in _PEFT_WEIGHTS):
            return str(p.parent), None
        return None, f"{path}: no adapter_model.safetensors beside it, not a PEFT adapter; passed over"
    if p.suffix != ".safetensors" or not p.is_file():
        return path, None
    if p.name in (_PEFT_WEIGHTS[0], _PEFT_WEIGHTS[-1]) and (p.parent / "adapter_config.json").is_file():
        return str(p.parent), None
    kind = adapter_kind(SafetensorsFile(p).keys())
    if kind is None:
        return None, f"{path}: not a LoRA adapter (no LoRA key in its header, not in a PEFT directory); passed over"
    return path, None
