"""How fast, how small and how accurate a ddiscan scan is on checkpoints shaped like real LLMs.

Run (not part of the test suite; needs the ``test`` extra for torch/transformers/PEFT):

    python benchmarks/bench_scan.py [--shape 1b|8b|all] [--cache-dir DIR] [--out benchmarks/RESULTS.md]

The first run generates, once, under ``--cache-dir`` (default ``~/.cache/ddiscan-bench``):

* base checkpoints shaped like LLaMA-3.2-1B (16 blocks, hidden 2048, k/v 512, MLP 8192,
  vocabulary 128256, tied embeddings, bfloat16, 2 shards + ``model.safetensors.index.json``)
  and like LLaMA-3-8B (32 blocks, hidden 4096, k/v 1024, MLP 14336, untied lm_head, 4
  shards), LLaMA key names, a ``config.json`` so transformers loads them. Every projection
  weight is W0 = A·diag(σ)·B + N: A (d × 256), B (256 × k) Gaussian with unit-norm-ish
  columns, σᵢ = 4·e·(i+1)^-0.4 with e ≈ the noise bulk's edge, N i.i.d. uniform noise of
  std 0.02 (a weight-like scale) — a power-law head that sinks into a Marchenko–Pastur
  bulk around i ≈ 40, so the top-t subspace is *not* trivially separated. Written one
  tensor at a time (never more than one weight in memory).
* PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``, float32) of rank
  8 and 64 on q/k/v/o and on every linear layer (q,k,v,o,gate,up,down), lora_alpha = 2r.
  lora_B mixes W0's top-2r generating directions with noise (half the energy each) so
  that O depends on getting the subspace right (a random ΔW has O ≈ 1 − t/d for *any*
  t-dimensional subspace and would hide every accuracy problem).

Then it measures, per shape and adapter (see ``--help`` for the knobs):

* read floor — time to read exactly the targeted base tensors' bytes once (``readinto``),
  warm page cache (median) and cold (after ``echo 3 > /proc/sys/vm/drop_caches``, if
  allowed);
* for each kernel of ``--sketch`` (default both, ``krylov`` and ``subspace``, side by side at
  their default iterations): the compute floor — the products that kernel makes with W0 alone
  (block Krylov: W0 Ω, W0ᵀ Q₀, per iteration W0 (W0ᵀ Qᵢ) and W0ᵀ Qᵢ₊₁, the t-wide residual;
  subspace iteration: W0 Ω, per iteration W0ᵀ Y and W0 Z, W0ᵀ Q, the residual; a scalar
  rescale in place of each orthogonalisation) as plain NumPy matmuls on float32 copies in
  memory, with ddiscan's t = r, q = 8; timed once per distinct (d, k, t) (best of 5) × its
  count; and ddiscan's own kernel on the same copies;
* ``ddiscan report --sketch KERNEL`` as a subprocess — wall, CPU (user+sys) and peak RSS
  from ``wait4``; warm (median) and cold; ``--exact`` once where asked (``--exact-on``);
* scans from a profile (``--profile-ratio``): ``ddiscan profile BASE`` once, then ``ddiscan
  report PROFILE ADAPTER`` against the scan from the base, and a cProfile of it;
* the torch path a user would write instead (subprocess): ``LlamaForCausalLM`` in bfloat16
  + ``PeftModel.from_pretrained``, then per LoRA layer ΔW = s·B·A, Q_t from
  ``torch.svd_lowrank(W0, q=t+8, niter=p)`` (exact: ``torch.linalg.svd``), S, O, M;
* accuracy — max |O − O_exact| over modules, O_exact from W0's top-t left singular vectors
  in float64 (eigh of the smaller Gram matrix; checked against ``ddiscan --exact``), on
  every module or on a sample of blocks (``--ref-blocks``);
* where asked (``--profile``), a per-module profile of ddiscan 0.1's subspace loop (an
  instrumented copy of its steps) and a cProfile of ``ddiscan.scan`` itself.

Results: a table on stdout, ``--out`` (Markdown: this script's section, between its markers;
the rest of the file stays), and the raw numbers as JSON in the cache
directory (``results-<shape>.json``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GEN_VERSION = "1"  # bump when the generated data changes
SIGNAL_RANK = 256
NOISE_STD = 0.02
EPS = 1e-6

SHAPES = {
    "1b": dict(label="LLaMA-3.2-1B-shaped", layers=16, hidden=2048, kv=512, mlp=8192, vocab=128256,
               heads=32, kv_heads=8, tie=True, shards=2),
    "8b": dict(label="LLaMA-3-8B-shaped", layers=32, hidden=4096, kv=1024, mlp=14336, vocab=128256,
               heads=32, kv_heads=8, tie=False, shards=4),
}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = QKVO + ("gate_proj", "up_proj", "down_proj")
ADAPTERS = {"r8-qkvo": (8, QKVO), "r64-qkvo": (64, QKVO), "r8-all": (8, ALL), "r64-all": (64, ALL)}
DEFAULT_ADAPTERS = {"1b": "r8-qkvo,r64-qkvo,r8-all,r64-all", "8b": "r8-qkvo,r64-qkvo,r8-all"}
ATTN = QKVO


def module_path(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if kind in ATTN else 'mlp'}.{kind}"


def module_shape(cfg: dict, kind: str) -> tuple[int, int]:
    h, kv, m = cfg["hidden"], cfg["kv"], cfg["mlp"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}[kind]


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- generation

def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (truncation), as uint16, little-endian."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.view(np.uint16)[..., 1::2].copy()


def signal_factors(name: str, d: int, k: int):
    """The generating factors of a projection weight: A (d × m) scaled by σ, B (m × k)."""
    rng = np.random.default_rng(seed_of(name))
    m = min(SIGNAL_RANK, d, k)
    edge = NOISE_STD * (math.sqrt(d) + math.sqrt(k))
    sigma = (4.0 * edge * (np.arange(m) + 1.0) ** -0.4).astype(np.float32)
    a = rng.standard_normal((d, m), dtype=np.float32) / np.float32(math.sqrt(d))
    b = rng.standard_normal((m, k), dtype=np.float32) / np.float32(math.sqrt(k))
    return a, sigma, b, rng


def make_tensor(name: str, shape: tuple, cfg: dict) -> np.ndarray:
    """One base tensor as bfloat16 bits (uint16)."""
    if len(shape) == 1:
        rng = np.random.default_rng(seed_of(name))
        return to_bf16_bits(1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32))
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        rng = np.random.default_rng(seed_of(name))
        out = np.empty(shape, np.uint16)
        for start in range(0, shape[0], 16384):
            stop = min(start + 16384, shape[0])
            block = rng.random((stop - start, shape[1]), dtype=np.float32)
            block -= 0.5
            block *= np.float32(NOISE_STD * math.sqrt(12))
            out[start:stop] = to_bf16_bits(block)
        return out
    d, k = shape
    a, sigma, b, rng = signal_factors(name, d, k)
    w = (a * sigma) @ b
    noise = rng.random((d, k), dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(NOISE_STD * math.sqrt(12))  # uniform with std NOISE_STD
    w += noise
    del noise
    return to_bf16_bits(w)


def checkpoint_tensors(cfg: dict):
    """(name, shape, shard) in file order."""
    per = math.ceil(cfg["layers"] / cfg["shards"])
    out = [("model.embed_tokens.weight", (cfg["vocab"], cfg["hidden"]), 0)]
    for layer in range(cfg["layers"]):
        shard = layer // per
        out.append((f"model.layers.{layer}.input_layernorm.weight", (cfg["hidden"],), shard))
        for kind in ALL[:4]:
            out.append((f"{module_path(layer, kind)}.weight", module_shape(cfg, kind), shard))
        out.append((f"model.layers.{layer}.post_attention_layernorm.weight", (cfg["hidden"],), shard))
        for kind in ALL[4:]:
            out.append((f"{module_path(layer, kind)}.weight", module_shape(cfg, kind), shard))
    last = cfg["shards"] - 1
    out.append(("model.norm.weight", (cfg["hidden"],), last))
    if not cfg["tie"]:
        out.append(("lm_head.weight", (cfg["vocab"], cfg["hidden"]), last))
    return out


def write_streamed(path: Path, entries: list, cfg: dict) -> int:
    """Write a BF16 safetensors file one tensor at a time; the header is known up front."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            f.write(make_tensor(name, shape, cfg).tobytes())
    tmp.rename(path)
    return offset


def generate_base(shape: str, root: Path) -> Path:
    cfg = SHAPES[shape]
    out = root / f"base-{shape}"
    done = out / f".complete-v{GEN_VERSION}"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tensors = checkpoint_tensors(cfg)
    n = cfg["shards"]
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = 0
    for i in range(n):
        entries = [(name, shp) for name, shp, s in tensors if s == i]
        print(f"  writing {out / names[i]} ({len(entries)} tensors)", file=sys.stderr, flush=True)
        total += write_streamed(out / names[i], entries, cfg)
    index = {"metadata": {"total_size": total}, "weight_map": {name: names[s] for name, _, s in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["mlp"], "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv_heads"],
        "head_dim": cfg["hidden"] // cfg["heads"], "vocab_size": cfg["vocab"], "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": cfg["tie"],
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": 128001,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    from safetensors import safe_open  # the real library must accept what was streamed
    for name in names:
        with safe_open(out / name, framework="np") as f:
            assert len(list(f.keys())) > 0
    done.write_text(f"{total} bytes in {time.perf_counter() - t0:.0f} s\n")
    print(f"  generated {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def generate_adapter(shape: str, adapter: str, root: Path) -> Path:
    from safetensors.numpy import save_file

    cfg = SHAPES[shape]
    r, kinds = ADAPTERS[adapter]
    out = root / f"adapter-{shape}-{adapter}"
    done = out / f".complete-v{GEN_VERSION}"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(cfg["layers"]):
        for kind in kinds:
            path = module_path(layer, kind)
            d, k = module_shape(cfg, kind)
            a, _, _, _ = signal_factors(f"{path}.weight", d, k)  # W0's generating directions
            rng = np.random.default_rng(seed_of(f"{adapter}:{path}"))
            lead = a[:, : 2 * r] @ rng.standard_normal((2 * r, r), dtype=np.float32)
            lead *= np.float32(1 / math.sqrt(2 * r))
            noise = rng.standard_normal((d, r), dtype=np.float32) / np.float32(math.sqrt(d))
            lora_b = 0.01 * (lead / np.linalg.norm(lead) + noise / np.linalg.norm(noise)) * math.sqrt(r)
            lora_a = rng.standard_normal((r, k), dtype=np.float32) / np.float32(math.sqrt(k))
            key = f"base_model.model.{path}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(lora_a, dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(lora_b, dtype=np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(root / f"base-{shape}"),
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": list(kinds), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    done.write_text("ok\n")
    return out


# ----------------------------------------------------------------------------- helpers

def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_measured(cmd: list, env: dict | None = None) -> dict:
    """Wall, CPU and peak RSS of one child process (``wait4`` gives that child's rusage)."""
    # Linux carries the parent's RSS high-water mark into a forked child across exec, so the
    # child's own ru_maxrss would include this (large) process: /usr/bin/time, itself small,
    # forks the measured command and reports its true peak (%M, KiB).
    timed = Path("/usr/bin/time").exists()
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as rss:
        full = ["/usr/bin/time", "-f", "%M", "-o", rss.name, *map(str, cmd)] if timed else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode(errors="replace")
        peak_kib = int(rss.read().split()[-1]) if timed else usage.ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": peak_kib / 1024,
            "majflt": usage.ru_majflt, "minflt": usage.ru_minflt}


def median_runs(runs: list) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"n": len(runs)}


def targeted(shape: str, adapter: str) -> list:
    cfg = SHAPES[shape]
    r, kinds = ADAPTERS[adapter]
    return [(f"{module_path(layer, kind)}.weight", *module_shape(cfg, kind), r)
            for layer in range(cfg["layers"]) for kind in kinds]


def tensor_locations(base: Path) -> dict:
    from ddiscan.io.index import TensorIndex

    index = TensorIndex(base)
    return {name: (index.file_of(name).path, index.info(name).start, index.info(name).end)
            for name in index.keys()}


def read_floor(keys: list, locations: dict) -> float:
    """Read exactly the targeted tensors' bytes once, into one reused buffer."""
    biggest = max(locations[k][2] - locations[k][1] for k in keys)
    buf = memoryview(bytearray(biggest))
    handles = {}
    t0 = time.perf_counter()
    for key in keys:
        path, start, end = locations[key]
        f = handles.get(path) or handles.setdefault(path, open(path, "rb", buffering=0))
        f.seek(start)
        want, got = end - start, 0
        while got < want:
            n = f.readinto(buf[got:want])
            got += n
    elapsed = time.perf_counter() - t0
    for f in handles.values():
        f.close()
    return elapsed


def widen_bf16(array: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16, as ddiscan maps them) or any float → float32; bfloat16 exactly,
    by a 16-bit shift (ddiscan 0.1's way)."""
    if array.dtype == np.uint16:
        out = array.astype(np.uint32)
        out <<= 16
        return out.view(np.float32)
    return np.array(array, dtype=np.float32)


def frobenius_blocks(w0: np.ndarray, block_rows: int = 1024) -> float:
    """‖W0‖_F accumulated in float64 over row blocks (ddiscan 0.1's way)."""
    total = 0.0
    for start in range(0, w0.shape[0], block_rows):
        block = w0[start:start + block_rows].astype(np.float64)
        total += float(np.sum(block * block))
    return math.sqrt(total)


def load_f32(base_index, key: str) -> np.ndarray:
    return widen_bf16(base_index.mapped(key))


KERNELS = ("krylov", "subspace")


def sketch_products(w0: np.ndarray, omega: np.ndarray, kernel: str, iters: int, t: int) -> None:
    """The products with W0 that ``kernel`` makes (ddiscan.krylov), alone, rescaled by a scalar
    between products (O(d·b), to keep the numbers finite) instead of orthonormalised.

    krylov (``block_krylov``): W0 Ω; W0ᵀ Q₀; per iteration W0 (W0ᵀ Qᵢ) and W0ᵀ Qᵢ₊₁ of the
    new block; every W0ᵀ Qᵢ is a block of the Rayleigh–Ritz matrix, so the residual
    W0 (W0ᵀ Q_t), t wide, for the error bar is the one product more: 3 + 2·iters.
    subspace (``subspace_iteration``): W0 Ω; per iteration W0ᵀ Y and W0 Z; W0ᵀ Q for
    Rayleigh–Ritz; the same residual: 3 + 2·iters, all b wide but the last.
    """
    y = w0 @ omega
    if kernel == "krylov":
        y /= np.float32(np.abs(y).max())
        rows = w0.T @ y
        for _ in range(iters):
            rows /= np.float32(np.abs(rows).max())
            y = w0 @ rows
            y /= np.float32(np.abs(y).max())
            rows = w0.T @ y
    else:
        for _ in range(iters):
            y /= np.float32(np.abs(y).max())
            z = w0.T @ y
            z /= np.float32(np.abs(z).max())
            y = w0 @ z
        y /= np.float32(np.abs(y).max())
        rows = w0.T @ y
    w0 @ np.ascontiguousarray(rows[:, :t])


def run_kernel(w0: np.ndarray, omega: np.ndarray, kernel: str, iters: int, t: int) -> None:
    """ddiscan's own kernel on the same float32 W0 in memory: products, orthogonalisation,
    Rayleigh–Ritz and residual (what the scan spends on a module once W0 is widened)."""
    from ddiscan import krylov

    if kernel == "krylov":
        krylov.block_krylov(w0, omega, t=t, iters=iters, xp=np)
    else:
        krylov.subspace_iteration(w0, omega, t=t, power_iters=iters, xp=np)


def compute_floor(mods: list, base_index, kernel: str, iters: int, q: int) -> tuple[float, float]:
    """(``kernel``'s products with W0 alone, ddiscan's whole kernel in memory), summed over
    modules; each distinct (d, k, t) timed once (best of 5 and of 3) × its count."""
    from ddiscan import spectral

    groups: dict = {}
    for key, d, k, r in mods:
        groups.setdefault((d, k, r), []).append(key)
    products = whole = 0.0
    for (d, k, r), keys in groups.items():
        w0 = load_f32(base_index, keys[0])
        t = min(r, d, k)
        omega = spectral.gaussian_test_matrix(k, min(t + q, d, k), 0).astype(np.float32)
        products += best_time(lambda: sketch_products(w0, omega, kernel, iters, t), 5) * len(keys)
        # block Krylov runs on W0's smaller side: its Ω has max(d, k) rows
        wide = omega if kernel != "krylov" or d <= k else spectral.gaussian_test_matrix(
            d, omega.shape[1], 0).astype(np.float32)
        whole += best_time(lambda: run_kernel(w0, wide, kernel, iters, t), 3) * len(keys)
    return products, whole


def best_time(fn, repeats: int) -> float:
    """The best of ``repeats`` wall times of ``fn()`` (a floor, robust to other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


_REF_CACHE: dict = {}


def reference_basis(base_index, key: str, tmax: int = 64) -> np.ndarray:
    """W0's top-``tmax`` left singular vectors in float64, from the smaller Gram matrix."""
    import scipy.linalg

    if key in _REF_CACHE:
        return _REF_CACHE[key]
    w = load_f32(base_index, key).astype(np.float64)
    d, k = w.shape
    if d <= k:
        g = w @ w.T
        _, vecs = scipy.linalg.eigh(g, subset_by_index=[d - tmax, d - 1])
        u = vecs[:, ::-1]
    else:
        g = w.T @ w
        vals, vecs = scipy.linalg.eigh(g, subset_by_index=[k - tmax, k - 1])
        u = (w @ vecs[:, ::-1]) / np.sqrt(vals[::-1])
    _REF_CACHE[key] = u
    return u


def exact_deviation(basis_t: np.ndarray, up: np.ndarray, down: np.ndarray, scale: float) -> float:
    qv, _ = np.linalg.qr(down.T)
    _, rv = np.linalg.qr(down.T)
    _, ru = np.linalg.qr(up)
    energy = scale**2 * float(np.sum(np.linalg.svd(ru @ rv.T, compute_uv=False) ** 2))
    inside = scale**2 * float(np.sum(((basis_t.T @ up) @ rv.T) ** 2))
    return min(1.0, max(0.0, 1.0 - inside / (energy + EPS)))


def reference_o(base_index, adapter_dir: Path, mods: list, ref_blocks) -> dict:
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, d, k, r in mods:
        block = int(key.split(".")[2])
        if ref_blocks is not None and block not in ref_blocks:
            continue
        stem = "base_model.model." + key[: -len(".weight")]
        up = tensors[f"{stem}.lora_B.weight"].astype(np.float64)
        down = tensors[f"{stem}.lora_A.weight"].astype(np.float64)
        basis = reference_basis(base_index, key)
        out[key] = exact_deviation(basis[:, :r], up, down, scale)
    return out


def max_err(values: dict, ref: dict) -> float | None:
    common = [k for k in ref if k in values]
    return max(abs(values[k] - ref[k]) for k in common) if common else None


# ----------------------------------------------------------------------------- torch path

TORCH_WORKER = r'''
import json, sys, time
import torch
from transformers import LlamaForCausalLM
from peft import PeftModel

base, adapter, mode, out, p, q = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
torch.manual_seed(0)
t0 = time.perf_counter()
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model.eval()
t1 = time.perf_counter()
eps = 1e-6
scores = {}
with torch.no_grad():
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        w0 = module.base_layer.weight.float()
        a = module.lora_A["default"].weight.float()
        b = module.lora_B["default"].weight.float()
        s = module.scaling["default"]
        r = a.shape[0]
        t = r
        delta = s * (b @ a)
        energy = (delta ** 2).sum().item()
        if mode == "exact":
            u, _, _ = torch.linalg.svd(w0, full_matrices=False)
            sigma = torch.linalg.svdvals(delta)
        else:
            u, _, _ = torch.svd_lowrank(w0, q=min(t + q, *w0.shape), niter=p)
            _, sigma, _ = torch.svd_lowrank(delta, q=min(r + q, *delta.shape), niter=p)
        basis = u[:, :t]
        sharp = sigma[0].item() ** 2 / (energy + eps)
        dev = min(1.0, max(0.0, 1.0 - ((basis.T @ delta) ** 2).sum().item() / (energy + eps)))
        base_norm = torch.linalg.norm(w0).item()
        m_norm = energy ** 0.5 / (base_norm + energy ** 0.5 + eps)
        key = name[len("base_model.model."):] + ".weight"
        scores[key] = {"S": sharp, "O": dev, "M_norm": m_norm, "DDI": sharp * dev * m_norm}
t2 = time.perf_counter()
json.dump({"load_s": t1 - t0, "score_s": t2 - t1, "scores": scores}, open(out, "w"))
'''


def torch_path(base: Path, adapter: Path, mode: str, p: int, q: int, workdir: Path) -> dict:
    script = workdir / "torch_worker.py"
    script.write_text(TORCH_WORKER)
    out = workdir / f"torch-{mode}.json"
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    stats = run_measured([sys.executable, str(script), str(base), str(adapter), mode, str(out), str(p), str(q)], env)
    data = json.loads(out.read_text())
    return stats | {"load_s": data["load_s"], "score_s": data["score_s"],
                    "O": {k: v["O"] for k, v in data["scores"].items()}}


BASELINE_RUNNER = "import sys; sys.path.insert(0, sys.argv.pop(1)); from ddiscan.cli import main; sys.exit(main())"


def ddiscan_report(base: Path, adapter: Path, out: Path, extra=(), tree: Path | None = None) -> dict:
    """``ddiscan report`` as a subprocess; with ``tree``, the ddiscan of that source tree
    (the baseline), run by the same interpreter."""
    exe = [str(Path(sys.executable).parent / "ddiscan")] if tree is None else [sys.executable, "-c",
                                                                               BASELINE_RUNNER, str(tree)]
    cmd = [*exe, "report", str(base), str(adapter), "-q", "--format", "json", "-o", str(out), *extra]
    return run_measured(cmd)


def baseline_tree(rev: str, root: Path) -> Path:
    """The repository's source at ``rev`` (``git archive``), once, under the cache directory."""
    tree = root / f"baseline-{rev}"
    if not (tree / "ddiscan").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "ddiscan"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def report_o(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {m["base_key"]: m["deviation"] for m in data["modules"] if m["deviation"] is not None}


# ----------------------------------------------------------------------------- profile

def profile_scan(base: Path, adapter: Path, p: int, q: int) -> dict:
    """Per-step times of a scan's loop, by an instrumented copy of ddiscan 0.1's calls (warm
    cache), so each elementary cost shows; then a cProfile of ``ddiscan.scan`` as it is now."""
    from ddiscan import spectral
    from ddiscan.io.index import TensorIndex
    from ddiscan.lora import load_adapter, lora_factors, match_modules

    try:
        from ddiscan.io.convert import widen as current_widen
    except ImportError:
        current_widen = None
    index = TensorIndex(base)
    adapter_obj = load_adapter(adapter)
    modules, _, _ = match_modules(adapter_obj, index, alpha=None, scaling=None, allow_unmatched=False)
    steps: dict = {}
    aside = set()

    def tick(name, t0, extra=False):
        now = time.perf_counter()
        steps[name] = steps.get(name, 0.0) + now - t0
        if extra:
            aside.add(name)
        return now

    omega_cache: dict = {}
    for module in modules:
        t0 = time.perf_counter()
        up, down = lora_factors(module, adapter_obj.file)
        t0 = tick("adapter factors -> f64", t0)
        mapped = index.mapped(module.base_key)
        t0 = tick("mmap the base tensor", t0)
        w0 = widen_bf16(mapped)
        t0 = tick("page faults + bf16->f32 (first touch of the map)", t0)
        widen_bf16(mapped)
        t0 = tick("(aside) bf16->f32 alone, pages resident", t0, True)
        if current_widen is not None:
            current_widen(mapped, np.float32, encoding="BF16")
            t0 = tick("(aside) ddiscan.io.convert.widen now (f32 + norm), pages resident", t0, True)
        frobenius_blocks(w0)
        t0 = tick("Frobenius norm (f64 row blocks)", t0)
        spectrum = spectral.update_spectrum(up, down, module.scale, xp=np)
        t0 = tick("update spectrum (QRs of the factors)", t0)
        t = min(module.r, module.d, module.k)
        width = min(t + q, module.d, module.k)
        if (module.k, width) not in omega_cache:
            omega_cache[(module.k, width)] = spectral.gaussian_test_matrix(module.k, width, 0)
        omega = omega_cache[(module.k, width)].astype(w0.dtype)
        t0 = tick("Omega (generate once per shape, cast)", t0)
        y = w0 @ omega
        t0 = tick("matmul W0 @ Omega", t0)
        y, _ = np.linalg.qr(y)
        t0 = tick("QR of d x (t+q)", t0)
        for _ in range(p):
            z = w0.T @ y
            t0 = tick("matmul W0^T @ Y (power iters)", t0)
            z, _ = np.linalg.qr(z)
            t0 = tick("QR of k x (t+q)", t0)
            y = w0 @ z
            t0 = tick("matmul W0 @ Z (power iters)", t0)
            y, _ = np.linalg.qr(y)
            t0 = tick("QR of d x (t+q)", t0)
        small = y.T @ w0
        t0 = tick("matmul Q0^T @ W0", t0)
        left, _, _ = np.linalg.svd(small, full_matrices=False)
        t0 = tick("SVD of (t+q) x k", t0)
        basis = y @ left[:, :t]
        spectral.deviation(basis, up, spectrum, module.scale, xp=np)
        t0 = tick("basis + deviation O", t0)
        del w0, mapped
    total = sum(v for k, v in steps.items() if k not in aside)

    # cProfile of the real ddiscan.scan (whatever it is now)
    import ddiscan

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    ddiscan.scan(base, adapter)
    prof.disable()
    scan_wall = time.perf_counter() - t0
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(14)
    lines = [ln for ln in stream.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return {"modules": len(modules), "steps": steps, "aside": sorted(aside), "total": total, "cprofile": lines[start:start + 15],
            "scan_wall_inprocess": scan_wall}


# ----------------------------------------------------------------------------- main

def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{p.get('internal_api')} {p.get('version')} ({p.get('threading_layer', '')}, "
                        f"{p.get('num_threads')} threads, {p.get('architecture', '')})" for p in threadpool_info()]
    except ImportError:
        info["blas"] = ["threadpoolctl not installed"]
    try:
        import torch

        info["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        pass
    info["packages"] = package_versions()
    return info


def package_versions() -> dict:
    """The installed version of ddiscan and of every package it and its test extra require."""
    from importlib import metadata

    names = ["ddiscan"]
    for requirement in metadata.requires("ddiscan") or []:
        name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
        if name and name not in names:
            names.append(name)
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def bench_one(shape: str, adapter: str, base: Path, adapter_dir: Path, args, work: Path, can_drop: bool) -> dict:
    from ddiscan.io.index import TensorIndex
    from ddiscan.options import DEFAULT_OVERSAMPLE

    mods = targeted(shape, adapter)
    keys = [m[0] for m in mods]
    locations = tensor_locations(base)
    index = TensorIndex(base)
    res = {"shape": shape, "adapter": adapter, "modules": len(mods), "q": DEFAULT_OVERSAMPLE,
           "bytes": sum(locations[k][2] - locations[k][1] for k in keys),
           "largest_f32_mb": max(d * k for _, d, k, _ in mods) * 4 / 1e6}
    log = lambda msg: print(f"[{shape} {adapter}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    read_floor(keys, locations)  # warm the cache
    res["read_warm"] = min(read_floor(keys, locations) for _ in range(max(3, args.repeats)))
    if can_drop and args.cold:
        cold = []
        for _ in range(args.cold_repeats):
            drop_caches()
            cold.append(read_floor(keys, locations))
        res["read_cold"] = statistics.median(cold)
    log(f"read floor warm {res['read_warm']:.2f}s cold {res.get('read_cold', float('nan')):.2f}s")

    ref_blocks = None
    if args.ref_blocks.get(shape) is not None:
        ref_blocks = set(args.ref_blocks[shape])
    ref = reference_o(index, adapter_dir, mods, ref_blocks)
    res["ref_modules"] = len(ref)
    res["O_range"] = [min(ref.values()), max(ref.values())]
    res["kernels"] = {kernel: bench_kernel(kernel, mods, index, keys, locations, (base, adapter_dir, work),
                                           args, can_drop, ref, log)
                      for kernel in args.sketch}
    if args.baseline:
        res["kernels"]["baseline"] = bench_baseline(args.baseline_tree, (base, adapter_dir, work), keys, locations,
                                                    args, can_drop, ref, log)
    res["startup"] = median_runs([run_measured([str(Path(sys.executable).parent / "ddiscan"), "--version"])
                                  for _ in range(3)])
    p = kernel_iters(args.sketch[0])
    out = work / "report.json"
    if f"{shape}:{adapter}" in args.exact_on:
        res["scan_exact"] = ddiscan_report(base, adapter_dir, out, ["--exact"])
        res["err_ddiscan_exact"] = max_err(report_o(out), ref)
        log(f"scan --exact {res['scan_exact']}")
    if not args.skip_torch:
        res["torch"] = torch_path(base, adapter_dir, "lowrank", p, res["q"], work)
        res["err_torch"] = max_err(res["torch"].pop("O"), ref)
        log(f"torch lowrank wall {res['torch']['wall']:.1f}s rss {res['torch']['rss_mb']:.0f}MB")
        if f"{shape}:{adapter}" in args.exact_on:
            res["torch_exact"] = torch_path(base, adapter_dir, "exact", p, res["q"], work)
            res["err_torch_exact"] = max_err(res["torch_exact"].pop("O"), ref)
            log(f"torch exact wall {res['torch_exact']['wall']:.1f}s")
    if f"{shape}:{adapter}" in args.profile_ratio:
        res["from_profile"] = from_profile(base, adapter_dir, work, args, log)
    return res


def kernel_iters(kernel: str) -> int:
    """The default iteration count of ``kernel`` (ddiscan.options)."""
    from ddiscan.options import DEFAULT_KRYLOV_ITERS, DEFAULT_POWER_ITERS

    return DEFAULT_KRYLOV_ITERS if kernel == "krylov" else DEFAULT_POWER_ITERS


def bench_kernel(kernel: str, mods: list, index, keys: list, locations: dict, paths: tuple, args, can_drop: bool,
                 ref: dict, log) -> dict:
    """One kernel's compute floor, its whole kernel in memory, and ``ddiscan report --sketch
    KERNEL`` warm (median) and cold, with its max |O − O_exact| over the reference modules."""
    from ddiscan.options import DEFAULT_OVERSAMPLE

    base, adapter_dir, work = paths
    iters = kernel_iters(kernel)
    res = {"iters": iters}
    res["compute"], res["kernel_in_memory"] = compute_floor(mods, index, kernel, iters, DEFAULT_OVERSAMPLE)
    log(f"{kernel}: compute floor {res['compute']:.2f}s, kernel in memory {res['kernel_in_memory']:.2f}s")
    out = work / f"report-{kernel}.json"
    res |= timed_scans(lambda: ddiscan_report(base, adapter_dir, out, ["--sketch", kernel]), out, keys, locations,
                       args, can_drop, ref)
    log(f"{kernel}: scan warm {res['scan_warm']}, cold {res.get('scan_cold')}, max |dO| {res['err_scan']:.2e}")
    return res


def timed_scans(run, out: Path, keys: list, locations: dict, args, can_drop: bool, ref: dict) -> dict:
    """``run()`` (a ``ddiscan report`` writing ``out``) warm (median of ``--repeats`` after a
    warm-up, the base's bytes in the page cache) and cold (after dropping it), with its
    max |O − O_exact| over the reference modules."""
    read_floor(keys, locations)
    run()  # warm-up
    res = {"scan_warm": median_runs([run() for _ in range(args.repeats)])}
    res["err_scan"] = max_err(report_o(out), ref)
    if can_drop and args.cold:
        runs = []
        for _ in range(args.cold_repeats):
            drop_caches()
            runs.append(run())
        res["scan_cold"] = median_runs(runs)
    return res


def bench_baseline(tree: Path, paths: tuple, keys: list, locations: dict, args, can_drop: bool, ref: dict,
                   log) -> dict:
    """``ddiscan report`` of the baseline tree (``--baseline``: the default before issue 18,
    subspace iteration p = 4 over a whole widened copy of W0) warm and cold, as
    :func:`bench_kernel` runs today's kernels, so the two are side by side in one run."""
    base, adapter_dir, work = paths
    out = work / "report-baseline.json"
    res = {"iters": None, "compute": None, "kernel_in_memory": None}
    res |= timed_scans(lambda: ddiscan_report(base, adapter_dir, out, tree=tree), out, keys, locations, args,
                       can_drop, ref)
    log(f"baseline: scan warm {res['scan_warm']}, cold {res.get('scan_cold')}, max |dO| {res['err_scan']:.2e}")
    return res


def from_profile(base: Path, adapter_dir: Path, work: Path, args, log) -> dict:
    """``ddiscan profile BASE`` (default options, --max-t 64) built once, then ``ddiscan report
    PROFILE ADAPTER`` warm (median) against ``ddiscan report BASE ADAPTER``, and a cProfile of
    the in-process scan from the profile: where a scan from a profile spends its time."""
    import ddiscan

    exe = str(Path(sys.executable).parent / "ddiscan")
    profile = work / "base.ddiprofile"
    res = {"build": run_measured([exe, "profile", str(base), "-o", str(profile), "--max-t", "64", "-q"]),
           "size_mb": profile.stat().st_size / 1e6}
    out = work / "report-profile.json"
    ddiscan_report(profile, adapter_dir, out)  # warm-up
    res["scan_warm"] = median_runs([ddiscan_report(profile, adapter_dir, out) for _ in range(args.repeats)])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    ddiscan.scan(profile, adapter_dir)
    prof.disable()
    res["scan_wall_inprocess"] = time.perf_counter() - t0
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(16)
    lines = [ln for ln in stream.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    res["cprofile"] = lines[start:start + 17]
    log(f"from profile: build {res['build']['wall']:.1f}s, scan warm {res['scan_warm']['wall']:.2f}s")
    return res


def fmt(x, spec=".2f"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


# main before issue 18's block Krylov merge (406195f^1): the default it is measured against
BASELINE = "5be9fd2"
STARTUP_LIMIT = 0.3  # seconds: more than this for `ddiscan --version` is flagged


def startup_cell(seconds) -> str:
    if seconds is not None and seconds > STARTUP_LIMIT:
        return f"**{fmt(seconds)} (> {STARTUP_LIMIT})**"
    return fmt(seconds)


BEGIN, END = "<!-- bench_scan: begin -->", "<!-- bench_scan: end -->"


def render(results: list, profiles: dict, info: dict, can_drop: bool, elapsed: float) -> str:
    lines = [BEGIN, "# ddiscan scan benchmark", "",
             f"Generated by `python benchmarks/bench_scan.py` ({info.get('finished', time.strftime('%Y-%m-%d %H:%M'))}, "
             f"{elapsed / 60:.0f} min, load average {fmt(info.get('load_end'), '.1f')} at the end). Rerun to refresh; "
             "see benchmarks/README.md.", "",
             "## Machine", "",
             f"* {info['cpus']} CPUs, {info['mem_gib']:.1f} GiB RAM, {info['platform']}",
             f"* Python {info['python']}, numpy {info['numpy']}, torch {info.get('torch', '—')}",
             *[f"* BLAS: {b}" for b in info["blas"]],
             "* packages: " + ", ".join(f"{k} {v}" for k, v in info.get("packages", {}).items()),
             f"* dropping the page cache (`echo 3 > /proc/sys/vm/drop_caches`): "
             f"{'works — cold numbers are real' if can_drop else 'not permitted — no cold numbers'}", ""]
    lines += render_results(results) + render_ratios(results) + render_from_profile(results)
    lines += render_profiles(profiles)
    return "\n".join(lines + [END]) + "\n"


def kernel_rows(results: list):
    """(result, kernel name, that kernel's numbers), one per adapter and kernel run."""
    for r in results:
        for kernel, kr in r["kernels"].items():
            yield r, kernel, kr


def kernel_label(kernel: str, kr: dict) -> str:
    if kernel == "baseline":
        return f"before issue 18 ({kr.get('rev', BASELINE)}: subspace, p = 4)"
    return f"{kernel} ({'iters' if kernel == 'krylov' else 'p'} = {kr['iters']})"


def render_results(results: list) -> list:
    g = lambda d, k, f="wall": d[k][f] if k in d else None  # noqa: E731
    lines = ["## Results", "",
             "Times in seconds (scan and torch: medians of warm runs; read warm and compute floor: best of "
             "runs; cold = after dropping the page cache, one run unless `--cold-repeats`). t = r, q = 8; each "
             "kernel at its default iterations (`--sketch krylov --krylov-iters 4` is ddiscan's default, "
             "`--sketch subspace --power-iters 4` the earlier one), the two run side by side in the same run, and "
             "beside them `before issue 18`: the `ddiscan report` of the repository as it was before the block "
             "Krylov kernel (`--baseline`; subspace iteration p = 4, no residual product, W0 widened whole), "
             "the default the issue's time target is measured against. "
             "`scan` is `ddiscan report ... -q --format json -o F --sketch KERNEL` as a subprocess, including "
             "interpreter start-up (`startup` = `ddiscan --version`).", "",
             "| shape | adapter | modules | targeted GB (bf16) | kernel | read warm | read cold | compute floor "
             "| kernel in memory | scan warm | scan cold | scan CPU | startup | scan RSS MB | torch path "
             "| torch RSS MB | scan --exact | torch exact |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- | --- |"]
    for r, kernel, kr in kernel_rows(results):
        lines.append(
            f"| {r['shape']} | {r['adapter']} | {r['modules']} | {r['bytes'] / 1e9:.2f} | {kernel_label(kernel, kr)} "
            f"| {fmt(r['read_warm'])} | {fmt(r.get('read_cold'))} | {fmt(kr['compute'])} "
            f"| {fmt(kr['kernel_in_memory'])} | {fmt(g(kr, 'scan_warm'))} | {fmt(g(kr, 'scan_cold'))} "
            f"| {fmt(g(kr, 'scan_warm', 'cpu'))} | {startup_cell(g(r, 'startup'))} "
            f"| {fmt(g(kr, 'scan_warm', 'rss_mb'), '.0f')} | {fmt(g(r, 'torch'))} | {fmt(g(r, 'torch', 'rss_mb'), '.0f')} "
            f"| {fmt(g(r, 'scan_exact'))} | {fmt(g(r, 'torch_exact'))} |")
    return lines + [""]


def render_ratios(results: list) -> list:
    lines = ["### Ratios against the targets", "",
             "Each scan against its own kernel's compute floor.", "",
             "| shape | adapter | kernel | warm: scan / (read+compute) ≤ 1.25 | cold: scan / max(read, compute) ≤ 1.25 "
             "| scan warm / before issue 18 | torch / scan ≥ 3 | scan RSS / torch RSS ≤ 0.2 | exact / scan "
             "| RSS ≤ 3·largest f32 + 150 MB "
             "| max abs ΔO scan | ΔO torch | ΔO ddiscan --exact | ΔO torch exact | reference modules |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    mark = lambda v, ok: "—" if v is None else f"{v:.2f} {'✓' if ok(v) else '✗'}"  # noqa: E731
    for r, kernel, kr in kernel_rows(results):
        warm = kr["scan_warm"]["wall"]
        cold = kr.get("scan_cold", {}).get("wall")
        rss, limit = kr["scan_warm"]["rss_mb"], 3 * r["largest_f32_mb"] + 150
        floor = kr["compute"] if kr["compute"] is not None else r["kernels"].get("subspace", {}).get("compute")
        rw = ratio(warm, r["read_warm"] + floor) if floor is not None else None
        rc = ratio(cold, max(r.get("read_cold") or 0, floor)) if cold and floor is not None else None
        before = r["kernels"].get("baseline", {}).get("scan_warm", {}).get("wall")
        rt = ratio(r.get("torch", {}).get("wall"), warm)
        rm = ratio(rss, r.get("torch", {}).get("rss_mb"))
        lines.append(
            f"| {r['shape']} | {r['adapter']} | {kernel_label(kernel, kr)} | {mark(rw, lambda v: v <= 1.25)} "
            f"| {mark(rc, lambda v: v <= 1.25)} | {mark(ratio(warm, before), lambda v: v <= 1.0)} "
            f"| {mark(rt, lambda v: v >= 3)} | {mark(rm, lambda v: v <= 0.2)} "
            f"| {fmt(ratio(r.get('scan_exact', {}).get('wall'), warm))} "
            f"| {rss:.0f} vs {limit:.0f} {'✓' if rss <= limit else '✗'} | {fmt(kr['err_scan'], '.1e')} "
            f"| {fmt(r.get('err_torch'), '.1e')} | {fmt(r.get('err_ddiscan_exact'), '.1e')} "
            f"| {fmt(r.get('err_torch_exact'), '.1e')} | {r['ref_modules']} (O in {r['O_range'][0]:.2f}–{r['O_range'][1]:.2f}) |")
    return lines + ["", "Columns: `read` reads exactly the targeted tensors' bytes once; `compute floor` is the "
                    "kernel's matrix products with W0 alone, as plain NumPy matmuls of the same shapes on float32 "
                    "copies in memory (a scalar rescale instead of each orthogonalisation): block Krylov makes "
                    "W0 Ω, W0ᵀ Q₀, per iteration W0 (W0ᵀ Qᵢ) and W0ᵀ Qᵢ₊₁, and the t-wide residual W0 (W0ᵀ Q_t) "
                    "of the error bar; subspace iteration W0 Ω, per iteration W0ᵀ Y and W0 Z, W0ᵀ Q and the same "
                    "residual (3 + 2 × iterations products for both, b = t + q wide but the last); one distinct "
                    "(d, k, t) timed (best of 5) × its count. `kernel in memory` is ddiscan's own kernel "
                    "(`krylov.block_krylov` / `krylov.subspace_iteration`: products, re-orthogonalisation, "
                    "Rayleigh–Ritz, residual) on the same float32 copies (best of 3). `torch path` loads base + "
                    "adapter with transformers + PEFT (bfloat16) and scores with `torch.svd_lowrank(q=t+8, "
                    "niter=p)`, `torch exact` with `torch.linalg.svd` (wall includes the model load: see the JSON). "
                    "ΔO = max |O − O_exact| over the reference modules, O_exact from float64 top-t singular "
                    "vectors of W0.", ""]


def render_from_profile(results: list) -> list:
    lines = []
    for r in results:
        fp = r.get("from_profile")
        if fp is None:
            continue
        default = next(iter(r["kernels"].values()))["scan_warm"]["wall"]
        speedup = ratio(default, fp["scan_warm"]["wall"])
        lines += [f"## Scans from a profile: {r['shape']} {r['adapter']}", "",
                  f"`ddiscan profile BASE -o P --max-t 64` (default sketch) took {fp['build']['wall']:.1f} s "
                  f"and wrote {fp['size_mb']:.0f} MB; `ddiscan report P ADAPTER` took "
                  f"{fp['scan_warm']['wall']:.2f} s warm (median; CPU {fp['scan_warm']['cpu']:.2f} s, peak RSS "
                  f"{fp['scan_warm']['rss_mb']:.0f} MB) against {default:.2f} s from the base with the same "
                  f"kernel: **{fmt(speedup, '.1f')}× faster** (target ≥ 20: "
                  f"{'✓' if speedup and speedup >= 20 else '✗'}). Interpreter start-up alone is "
                  f"{fmt(r['startup']['wall'])} s of it. cProfile of `ddiscan.scan(P, ADAPTER)` in-process "
                  f"({fp['scan_wall_inprocess']:.2f} s), top functions by cumulative time:", "",
                  "```", *fp["cprofile"], "```", ""]
    return lines


def render_profiles(profiles: dict) -> list:
    lines = []
    for (shape, adapter), prof in profiles.items():
        lines += [f"## Profile: {shape} {adapter} ({prof['modules']} modules, warm cache, in-process)", "",
                  "An instrumented copy of `ddiscan.scan`'s loop with the subspace kernel of ddiscan 0.1 "
                  "(same calls, timed one by one; Householder QRs, to split matmuls from QRs):", "",
                  "| step | total s | per module ms | share |", "| --- | --- | --- | --- |"]
        for name, secs in sorted(prof["steps"].items(), key=lambda kv: -kv[1]):
            share = "" if name in prof["aside"] else f"{100 * secs / prof['total']:.0f}%"
            lines.append(f"| {name.strip()} | {secs:.2f} | {1000 * secs / prof['modules']:.1f} | {share} |")
        lines += [f"| **total** | {prof['total']:.2f} | {1000 * prof['total'] / prof['modules']:.1f} | |", "",
                  f"cProfile of `ddiscan.scan` as it is now (in-process wall {prof['scan_wall_inprocess']:.2f} s), "
                  "top functions by own time:", "", "```", *prof["cprofile"], "```", ""]
    return lines


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` by ``section`` (which carries
    them), or append it: the other scripts' sections of RESULTS.md stay as they are."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["1b", "8b", "all"], default="1b")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ddiscan-bench")
    parser.add_argument("--adapters", default=None, help="comma-separated, of " + ", ".join(ADAPTERS)
                        + f" (default 1b: {DEFAULT_ADAPTERS['1b']}; 8b: {DEFAULT_ADAPTERS['8b']})")
    parser.add_argument("--repeats", type=int, default=3, help="warm repetitions (median)")
    parser.add_argument("--cold-repeats", type=int, default=1)
    parser.add_argument("--no-cold", dest="cold", action="store_false")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--exact-on", default="1b:r8-qkvo", help="SHAPE:ADAPTER list for --exact runs")
    parser.add_argument("--ref-blocks-8b", default="0,31",
                        help="blocks of the 8b shape whose exact O is computed ('all' for every one)")
    parser.add_argument("--ref-blocks-1b", default="0,5,10,15",
                        help="blocks of the 1b shape whose exact O is computed ('all' for every one)")
    parser.add_argument("--sketch", default=",".join(KERNELS),
                        help="comma-separated kernels to run side by side, the first also for the torch path "
                        f"(default {','.join(KERNELS)})")
    parser.add_argument("--profile", default="", help="SHAPE:ADAPTER list for the per-step profile of "
                        "ddiscan 0.1's subspace loop")
    parser.add_argument("--profile-ratio", default="1b:r64-all",
                        help="SHAPE:ADAPTER list to time scans from a `ddiscan profile` against from the base")
    parser.add_argument("--baseline", default=BASELINE,
                        help="git revision whose ddiscan is run beside today's (default: main before issue 18, "
                             "whose default was subspace iteration p = 4 on a whole widened W0); '' to skip")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite --out from the last run's results-<shape>.json (also a partial one)")
    args = parser.parse_args(argv)
    args.exact_on = set(filter(None, args.exact_on.split(",")))
    args.sketch = [k for k in args.sketch.split(",") if k]
    if not args.sketch or set(args.sketch) - set(KERNELS):
        parser.error(f"--sketch: a comma-separated list of {', '.join(KERNELS)}")
    args.profile_ratio = set(filter(None, args.profile_ratio.split(",")))
    args.ref_blocks = {s: None if v == "all" else [int(b) for b in v.split(",")]
                       for s, v in (("1b", args.ref_blocks_1b), ("8b", args.ref_blocks_8b))}
    shapes = ["1b", "8b"] if args.shape == "all" else [args.shape]
    root = args.cache_dir.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.render_only:
        data = json.loads((root / f"results-{args.shape}.json").read_text())
        profiles = {tuple(k.split(":")): v for k, v in data["profiles"].items()}
        text = render(data["results"], profiles, data["info"], data.get("can_drop", True), data.get("elapsed", 0))
        write_section(args.out, text)
        print(text)
        return 0

    plan = []
    for shape in shapes:
        base = generate_base(shape, root)
        for adapter in (args.adapters or DEFAULT_ADAPTERS[shape]).split(","):
            plan.append((shape, adapter, base, generate_adapter(shape, adapter, root)))
    if args.generate_only:
        return 0

    if args.baseline:
        args.baseline_tree = baseline_tree(args.baseline, root)
    can_drop = drop_caches()
    info = machine_info()
    results, profiles = [], {}
    with tempfile.TemporaryDirectory(prefix="ddiscan-bench-") as tmp:
        for shape, adapter, base, adapter_dir in plan:
            results.append(bench_one(shape, adapter, base, adapter_dir, args, Path(tmp), can_drop))
            if f"{shape}:{adapter}" in args.profile:
                from ddiscan.options import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS
                profiles[(shape, adapter)] = profile_scan(base, adapter_dir, DEFAULT_POWER_ITERS, DEFAULT_OVERSAMPLE)
            (root / f"results-{args.shape}.json").write_text(json.dumps(
                {"info": info, "results": results, "can_drop": can_drop,
                 "elapsed": time.perf_counter() - started,
                 "profiles": {f"{s}:{a}": v for (s, a), v in profiles.items()}}, indent=1, default=str))
    info |= {"finished": time.strftime("%Y-%m-%d %H:%M"), "load_end": os.getloadavg()[0]}
    (root / f"results-{args.shape}.json").write_text(json.dumps(
        {"info": info, "results": results, "can_drop": can_drop, "elapsed": time.perf_counter() - started,
         "profiles": {f"{s}:{a}": v for (s, a), v in profiles.items()}}, indent=1, default=str))
    text = render(results, profiles, info, can_drop, time.perf_counter() - started)
    print(text)
    write_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
