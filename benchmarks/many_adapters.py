"""How much `ddiscan report BASE A1 A2 ...` saves over one run per adapter.

    python benchmarks/many_adapters.py [--adapters 4] [--blocks 8] [--hidden 2048]

Generates (once, in a temporary directory) a bfloat16 base of BLOCKS q/k/v/o projections
and ADAPTERS rank-8 PEFT adapters on them, then times, in fresh processes, one
`ddiscan report` per adapter against one `ddiscan report` of all of them, and checks the
reports agree. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def make(root: Path, blocks: int, hidden: int, adapters: int) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(0)
    kv = hidden // 4
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    base = {}
    for i in range(blocks):
        for name, (d, k) in shapes.items():
            low = rng.standard_normal((d, 32), dtype=np.float32) @ rng.standard_normal((32, k), dtype=np.float32)
            base[f"model.layers.{i}.self_attn.{name}.weight"] = (0.002 * low + 0.02 * rng.standard_normal(
                (d, k), dtype=np.float32)).astype(ml_dtypes.bfloat16)
    save_file(base, root / "base.safetensors")
    paths = []
    for a in range(adapters):
        out = root / f"adapter-{a}"
        out.mkdir()
        tensors = {}
        for key, w in base.items():
            d, k = w.shape
            stem = "base_model.model." + key.removesuffix(".weight")
            tensors[stem + ".lora_A.weight"] = rng.standard_normal((8, k), dtype=np.float32) / np.sqrt(k)
            tensors[stem + ".lora_B.weight"] = rng.standard_normal((d, 8), dtype=np.float32) * 0.01
        save_file(tensors, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
        paths.append(out)
    return root / "base.safetensors", paths


def timed(args) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ddiscan.cli", *map(str, args)], check=True,
                         capture_output=True, text=True).stdout
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make(Path(tmp), opts.blocks, opts.hidden, opts.adapters)
        separate, together = [], []
        for _ in range(opts.repeat):
            runs = [timed(["report", base, a, "--format", "jsonl", "-q"]) for a in adapters]
            separate.append(sum(t for t, _ in runs))
            seconds, stream = timed(["report", base, *adapters, "--format", "jsonl", "-q"])
            together.append(seconds)
            assert stream == "".join(out for _, out in runs), "reports differ"
        s, t = min(separate), min(together)
        print("| adapters | base | separate runs (s) | one run (s) | saving |")
        print("|---|---|---|---|---|")
        print(f"| {opts.adapters} × rank 8 on q/k/v/o | {opts.blocks} blocks, hidden {opts.hidden}, bf16 "
              f"| {s:.2f} | {t:.2f} | {s / t:.2f}× |")


if __name__ == "__main__":
    main()
