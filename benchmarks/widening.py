"""Whole-tensor widening against panel products, in the kernels and in the real scan (issue 18, item 4).

Run:  python benchmarks/widening.py [--rows 2048] [--cols 8192] [--repeats 5] [--base DIR --adapters A,B]
                                    [--out benchmarks/WIDENING.md]

Two ways to multiply a bfloat16 W0 by the sketch's thin blocks:

* ``whole`` (ddiscan before :mod:`ddiscan.panels`): widen W0 once into a float32 copy
  (:func:`ddiscan.io.convert.widen`), then every product reads the copy;
* ``panels`` (:class:`ddiscan.panels.Panels`): never hold a float32 W0; each product widens
  one panel of rows at a time into a reused float32 buffer and multiplies it (W0 X panel by
  panel, W0ᵀ Y as a sum of panelᵀ Y[panel]), so every product pays the widening again.

Part 1, the products alone: one W0 (``--rows`` × ``--cols``, the LLaMA-3.2-1B MLP shape by
default), 2 + 2n products of width b = 16 (n = 4), one BLAS thread; wall time (median of
``--repeats``) and peak extra memory (tracemalloc: NumPy's allocations beyond the mapped
bits), for several panel sizes (``--panel-kib``), which chooses ``ddiscan.panels.PANEL_BYTES``.

Part 2, the real ``ddiscan.scan`` both ways, each run in a subprocess of its own (wall time
of the scan call, and peak RSS from ``resource.getrusage``; each variant replaces
``CheckpointSource.load`` by the one or the other, in that subprocess only), the two
variants interleaved, median of ``--repeats``, BLAS at its default threads (or ``--threads``): on a checkpoint
of two LLaMA-3.2-1B-shaped blocks written here with bench_scan.py's generator (bfloat16,
power-law spectra over a noise bulk) and its rank-8 q/k/v/o and rank-64 all-linear
adapters; with ``--base``, on that base and its ``--adapters`` too (e.g. the 16-block
benchmark base in ~/.cache/ddiscan-bench). The scores of the two ways are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PRODUCTS = 10  # 2 + 2n with n = 4
WIDTH = 16
THREADS = None  # BLAS at its default (the scan's default); --threads sets it
FIELDS = ("ddi", "deviation", "sharpness", "magnitude_norm", "base_norm")


# ----------------------------------------------------------------------------- part 1: products

def products(w0, omega):
    """The sketch's products: W0 Ω, then n times W0 (W0ᵀ Y), then W0ᵀ Y."""
    y = w0 @ omega
    for _ in range((PRODUCTS - 2) // 2):
        y = w0 @ (w0.mT @ y)
    return w0.mT @ y


def whole(bits, shape, omega):
    from ddiscan.io.convert import widen

    w0, _ = widen(bits.reshape(shape), np.float32, encoding="BF16")
    return products(w0, omega)


def panels(bits, shape, omega, panel_bytes: int):
    from ddiscan.panels import Panels

    w0, _ = Panels.read(bits.reshape(shape), encoding="BF16", panel_bytes=panel_bytes)
    return products(w0, omega)


def measure(repeats: int, fn, *args):
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak


def part_products(args) -> list[str]:
    from threadpoolctl import threadpool_limits

    shape = (args.rows, args.cols)
    rng = np.random.default_rng(0)
    bits = (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).reshape(-1)
    omega = rng.standard_normal((args.cols, WIDTH), dtype=np.float32)
    results = {}
    with threadpool_limits(1):
        reference = whole(bits, shape, omega)
        results["whole"] = measure(args.repeats, whole, bits, shape, omega)
        for kib in args.panel_kib:
            got = panels(bits, shape, omega, kib << 10)
            assert np.allclose(got, reference, rtol=1e-3, atol=1e-3 * float(np.abs(reference).max()))
            results[f"panels, {kib} KiB buffer ({max(1, (kib << 10) // (4 * args.cols))} rows)"] = measure(
                args.repeats, panels, bits, shape, omega, kib << 10)
    return [
        f"W0 {args.rows}×{args.cols} bfloat16, {PRODUCTS} products of width {WIDTH} (the sketch with 4 "
        f"iterations), one BLAS thread, median of {args.repeats}; a float32 copy of W0 is "
        f"{args.rows * args.cols * 4 / 2**20:.0f} MiB.",
        "",
        "| way | wall time (s) | peak extra memory (MiB) |",
        "|---|---|---|",
        *(f"| {name} | {t:.3f} | {peak / 2**20:.1f} |" for name, (t, peak) in results.items()),
    ]


# ----------------------------------------------------------------------------- part 2: the scan

def child(variant: str, base: str, adapter: str) -> None:
    """One scan in this process, W0 loaded the ``variant`` way; prints its wall time, peak
    RSS and scores as JSON."""
    import ddiscan
    from ddiscan.io.convert import widen
    from ddiscan.panels import Panels
    from ddiscan.sources import CheckpointSource

    def load(self, key, fetched):
        encoding = self.index.info(key).dtype
        if variant == "whole":
            return widen(fetched, np.float32, encoding=encoding)
        return Panels.read(fetched, encoding=encoding)
    CheckpointSource.load = load
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = ddiscan.scan(base, adapter, threads=THREADS)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores = {m.name: [getattr(m, f) for f in FIELDS] for m in report.modules}
    print(json.dumps({"wall": wall, "rss_mib": peak / 1024, "start_rss_mib": before / 1024, "scores": scores}))


def run_child(variant: str, base: Path, adapter: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(base), str(adapter),
                          *(["--threads", str(THREADS)] if THREADS else [])],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def largest_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for name in a for x, y in zip(a[name], b[name]) if x is not None and y is not None)


def scan_rows(label: str, base: Path, adapter: Path, repeats: int) -> list[str]:
    runs = {"whole": [], "panels": []}
    for _ in range(repeats):
        for variant in runs:
            runs[variant].append(run_child(variant, base, adapter))
    difference = largest_difference(runs["panels"][0]["scores"], runs["whole"][0]["scores"])
    rows = []
    for variant, results in runs.items():
        wall = statistics.median(r["wall"] for r in results)
        rss = statistics.median(r["rss_mib"] for r in results)
        start = statistics.median(r["start_rss_mib"] for r in results)
        spread = f"{min(r['wall'] for r in results):.2f}–{max(r['wall'] for r in results):.2f}"
        rows.append(f"| {label} | {variant} | {wall:.2f} ({spread}) | {rss:.0f} | {rss - start:.0f} | "
                    f"{difference:.1e} |")
    return rows


def small_checkpoint(root: Path) -> tuple[Path, list[Path]]:
    """Two LLaMA-3.2-1B-shaped blocks (bfloat16) and the r8 q/k/v/o and r64 all-linear adapters."""
    import bench_scan

    bench_scan.SHAPES["1b-2"] = dict(bench_scan.SHAPES["1b"], label="two LLaMA-3.2-1B blocks", layers=2,
                                     vocab=1024, shards=1)
    base = bench_scan.generate_base("1b-2", root)
    return base, [bench_scan.generate_adapter("1b-2", name, root) for name in ("r8-qkvo", "r64-all")]


def part_scan(args) -> list[str]:
    lines = ["| base, adapter | way | scan wall (s), median (range) | peak RSS (MiB) | RSS grown in the scan (MiB) "
             "| max abs score difference |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = small_checkpoint(Path(tmp))
        for adapter in adapters:
            lines += scan_rows(f"2 blocks, {adapter.name.removeprefix('adapter-1b-2-')}", base, adapter, args.repeats)
    for name in args.adapters:
        lines += scan_rows(f"{args.base.name}, {name}", args.base, args.base.parent / name, args.repeats)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--panel-kib", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", type=Path, help="a further base to scan both ways (its adapters beside it)")
    parser.add_argument("--adapters", type=lambda s: s.split(","), default=[])
    parser.add_argument("--out", type=Path, default=HERE / "WIDENING.md")
    parser.add_argument("--threads", type=int, help="BLAS threads of the scans (default: BLAS's own)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if args.child:
        return child(*args.child)
    load = os.getloadavg()
    body = ["## The products alone", "", *part_products(args), "", "## The scan", "", *part_scan(args)]
    command = " ".join(["python", "benchmarks/widening.py", *sys.argv[1:]])
    lines = ["# Widening bfloat16 W0: whole-tensor copy against panel products", "",
             f"Generated by `{command}` (numpy {np.__version__}; a shared 2-core machine, load average "
             f"{load[0]:.2f} before and {os.getloadavg()[0]:.2f} after: compare within the run).", "", *body, ""]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
