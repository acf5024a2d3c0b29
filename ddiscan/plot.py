"""The heatmap and the sorted DDI curve as a picture (the optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import UsageError
from .io.writer import literal, write_atomic
from .render import grid
from .report import Report

__all__ = ["plot_report", "check_plot", "SIZE_INCHES", "DPI"]

SIZE_INCHES = (11.0, 4.5)
DPI = 100


def check_plot(path) -> str:
    """The picture format of ``path`` ("png" or "svg"), once matplotlib is known to import;
    UsageError otherwise. The command line calls it before any work is done."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise UsageError(f"{literal(path)}: {{plot}} writes .png or .svg files", "plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("{plot} needs matplotlib: pip install 'ddiscan[plot]'", "plot") from None
    return fmt


def plot_report(report: Report, path, *, cut: tuple[str, float] | None = None) -> None:
    """Draw DDI by block × kind and the sorted DDI curve to ``path`` (.png or .svg).

    ``cut`` marks a selection on the curve: ``("top", n)`` after the n-th module,
    ``("theta", x)`` at DDI = x, ``("theta_norm", x)`` at DDI_norm = x.
    """
    path = Path(path)
    fmt = check_plot(path)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    blocks, kinds, values = grid(report)
    fig, (left, right) = plt.subplots(1, 2, figsize=SIZE_INCHES, dpi=DPI, gridspec_kw={"width_ratios": [1, 1.3]})
    image = left.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", interpolation="nearest")
    left.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    left.set_yticks(range(len(blocks)), ["-" if b is None else str(b) for b in blocks])
    left.set_xlabel("module kind")
    left.set_ylabel("block")
    left.set_title("DDI by block and module kind")
    fig.colorbar(image, ax=left, label="DDI")

    finite = [m for m in report.modules if m.finite]
    ddi = np.array([m.ddi for m in finite])
    ranks = np.arange(1, len(ddi) + 1)
    right.plot(ranks, ddi, marker="o", markersize=3, linewidth=1)
    right.set_xlabel("rank (highest DDI first)")
    right.set_ylabel("DDI")
    right.set_title(f"{len(finite)} modules, sorted by DDI")
    if cut is not None and len(ddi):
        rule, value = cut
        if rule == "top":
            right.axvline(value + 0.5, color="crimson", linestyle="--", label=f"top {value:g}")
        else:
            threshold = value if rule == "theta" else value / (1 - value) if value < 1 else np.inf
            right.axhline(threshold, color="crimson", linestyle="--", label=f"{rule.replace('_', ' ')} = {value:g}")
        right.legend()
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
