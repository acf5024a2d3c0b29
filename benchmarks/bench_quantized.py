"""A scan of a quantized base against the same scan of the bfloat16 base: time and peak RSS.

Run (not part of the test suite; needs the ``test`` extra for torch and bitsandbytes):

    python benchmarks/bench_quantized.py [--cache-dir DIR] [--adapter r8-qkvo] [--repeats 3]
                                         [--out benchmarks/RESULTS.md]

It uses (generating once, as ``bench_scan.py`` does) the LLaMA-3.2-1B-shaped bfloat16 base
and the adapter under ``--cache-dir``, and writes beside them, once:

* ``base-1b-nf4``: every projection weight quantized by bitsandbytes' own
  ``quantize_4bit`` (NF4, block 64, double quantization) and stored as transformers'
  ``save_pretrained`` stores ``Params4bit``; the config's ``quantization_config`` from
  ``BitsAndBytesConfig``; embeddings and norms stay bfloat16;
* ``base-1b-fp8``: every projection weight in float8 e4m3fn with one ``weight_scale_inv``
  per 128 × 128 block (DeepSeek-V3's layout; ``FineGrainedFP8Config``), quantized here by
  vectorised NumPy (block amax / 448).

Then ``ddiscan report`` runs as a subprocess on each base (warm page cache, median of
``--repeats``): wall, CPU and peak RSS. The targets (issue 17): scan time within 1.25× of the
bfloat16 scan, peak RSS ≤ 3 × the largest float32 tensor + 150 MB. The section it writes
into ``--out`` is its own (between its markers), so other sections of RESULTS.md stay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scan  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BEGIN, END = "<!-- bench_quantized: begin -->", "<!-- bench_quantized: end -->"


def _projection(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS


def _nf4(name: str, bf16) -> dict:
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(bf16.float(), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
    stem = name.removesuffix(".weight")
    return {name: packed, **{f"{stem}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _fp8(name: str, bf16) -> dict:
    import ml_dtypes
    import torch

    w = bf16.float().numpy()
    (d, k), b = w.shape, 128
    padded = np.zeros((-(-d // b) * b, -(-k // b) * b), np.float32)
    padded[:d, :k] = w
    blocks = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / np.float32(448.0)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:d, :k].astype(ml_dtypes.float8_e4m3fn)
    return {name: torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn),
            name.removesuffix(".weight") + ".weight_scale_inv": torch.from_numpy(scale.astype(np.float32))}


def quantized_base(base: Path, kind: str) -> Path:
    """``base`` with its projection weights stored as ``kind`` (nf4 or fp8), written once."""
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = base.parent / f"{base.name}-{kind}"
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(str(base / shard), framework="pt") as f:
            for name in f.keys():
                value = f.get_tensor(name)
                stored = (_nf4 if kind == "nf4" else _fp8)(name, value) if _projection(name) else {name: value}
                tensors.update(stored)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((base / "config.json").read_text())
    quant = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
             if kind == "nf4" else transformers.FineGrainedFP8Config(weight_block_size=(128, 128)))
    config["quantization_config"] = json.loads(json.dumps(quant.to_dict(), default=str))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    done.write_text(f"{time.perf_counter() - t0:.0f} s\n")
    return out


def measure(bases: dict, adapter: Path, repeats: int, work: Path) -> dict:
    """Each base's scan, the runs interleaved (bf16, nf4, fp8, bf16, ...) so that a load
    from elsewhere on the machine weighs on every base alike."""
    for base in bases.values():
        bench_scan.ddiscan_report(base, adapter, work / "warmup.json")  # brings the files into the page cache
    runs: dict = {kind: [] for kind in bases}
    for _ in range(repeats):
        for kind, base in bases.items():
            runs[kind].append(bench_scan.ddiscan_report(base, adapter, work / f"report-{kind}.json"))
    results = {}
    for kind in bases:
        modules = json.loads((work / f"report-{kind}.json").read_text())["modules"]
        results[kind] = bench_scan.median_runs(runs[kind]) | {
            "format": (modules[0]["quantization"] or {}).get("format", "bf16") if modules else "—",
            "ddi": {m["name"]: m["ddi"] for m in modules}}
    return results


def render(results: dict, largest_mb: float, adapter: str, info: str) -> str:
    bound = 3 * largest_mb + 150
    plain = results["bf16"]
    rows = []
    for kind, r in results.items():
        ddi = [abs(r["ddi"][n] - plain["ddi"][n]) / plain["ddi"][n] for n in plain["ddi"]]
        ratio, cpu = r["wall"] / plain["wall"], r["cpu"] / plain["cpu"]
        rows.append(f"| {kind} | {r['format']} | {r['wall']:.2f} | {r['cpu']:.2f} | {ratio:.2f} "
                    f"{'✓' if ratio <= 1.25 else '✗'} | {cpu:.2f} | {r['rss_mb']:.0f} vs {bound:.0f} "
                    f"{'✓' if r['rss_mb'] <= bound else '✗'} | {statistics.median(ddi):.1e} |")
    return "\n".join([
        BEGIN, "# Quantized bases (issue 17)", "",
        f"Generated by `python benchmarks/bench_quantized.py` ({time.strftime('%Y-%m-%d %H:%M')}); "
        f"{info}. The LLaMA-3.2-1B-shaped base as bfloat16, as bitsandbytes NF4 (block 64, "
        "double quantization) and as FP8 with 128 × 128 block scales; adapter "
        f"`{adapter}`; `ddiscan report ... -q --format json -o F` as a subprocess, warm page cache, medians "
        f"of interleaved runs; load average {os.getloadavg()[0]:.1f} when it ended.", "",
        "| base | quantization.format | scan wall s | scan CPU s | time / bf16 ≤ 1.25 | CPU / bf16 "
        "| peak RSS MB ≤ 3·largest f32 + 150 | median rel. DDI change vs bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        "The DDI change is the quantization error of W0 itself, not ddiscan's (tests/test_bnb.py and",
        "tests/test_fp8.py compare the dequantized W0 with bitsandbytes' and compressed-tensors' own).", END, ""])


def write_section(path: Path, section: str) -> None:
    bench_scan.write_section(path, section, BEGIN, END)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ddiscan-bench")
    parser.add_argument("--adapter", default="r8-qkvo", choices=sorted(bench_scan.ADAPTERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    base = bench_scan.generate_base("1b", args.cache_dir)
    adapter = bench_scan.generate_adapter("1b", args.adapter, args.cache_dir)
    work = args.cache_dir / "quantized-work"
    work.mkdir(exist_ok=True)
    bases = {"bf16": base, "nf4": quantized_base(base, "nf4"), "fp8-block": quantized_base(base, "fp8")}
    results = measure(bases, adapter, args.repeats, work)
    cfg = bench_scan.SHAPES["1b"]
    largest_mb = max(d * k for d, k in (bench_scan.module_shape(cfg, kind) for kind in
                                        bench_scan.ADAPTERS[args.adapter][1])) * 4 / 1e6
    machine = bench_scan.machine_info()
    info = f"{machine['cpus']} CPUs, numpy {machine['numpy']}"
    section = render(results, largest_mb, args.adapter, info)
    print(section)
    write_section(args.out, section)
    (args.cache_dir / "results-quantized.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
