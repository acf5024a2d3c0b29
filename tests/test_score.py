"""ddiscan.score: each method's scorer, one signature, against a float64 dense reference
(explicit ΔW, full SVDs), and the table of methods that ranks and selects by them."""

import math
from pathlib import Path

import numpy as np
import pytest

from ddiscan.io.index import TensorIndex
from ddiscan.lora import load_adapter, lora_factors, match_modules
from ddiscan.options import ScanOptions
from ddiscan.spectral import EPS
from ddiscan.score import METHOD_TABLE, SCORES, ModuleScore, components, score, suspicion
from ddiscan.sketch import Subspace

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
UNALIGNED = ROOT / "fixtures" / "tiny-llama-unaligned.safetensors"


class Weight:
    """What a scorer is given: the weight's norm, the matrix as a module sees it, Q_t (exact)."""

    def __init__(self, matrix: np.ndarray):
        self.matrix, self.norm = matrix, float(np.linalg.norm(matrix))

    def oriented(self, module):
        return self.matrix

    def basis(self, module, t):
        return Subspace(np.linalg.svd(self.matrix)[0][:, :t], error=0.0)


def cases():
    adapter, base = load_adapter(ADAPTER), TensorIndex(BASE)
    for module in match_modules(adapter, base)[0]:
        up, down = lora_factors(module, adapter.file)
        yield module, up, down, np.asarray(base.array(module.base_key), np.float64)


def dense_ddi(w0, delta, t):
    """S, O, M_norm by SPEC.md §2's equations, ε included."""
    sigma = np.linalg.svd(delta, compute_uv=False)
    u = np.linalg.svd(w0)[0][:, :t]
    s = sigma[0] ** 2 / (np.sum(sigma**2) + EPS)
    o = 1.0 - np.linalg.norm(u.T @ delta) ** 2 / (np.linalg.norm(delta) ** 2 + EPS)  # Eq. 3
    m = np.linalg.norm(delta) / (np.linalg.norm(w0) + np.linalg.norm(delta) + EPS)
    return s, o, m


@pytest.mark.parametrize("magnitude", ["bounded", "raw"])
def test_ddi_scorer_matches_the_dense_reference(magnitude):
    options = ScanOptions(magnitude=magnitude)
    for module, up, down, w0 in cases():
        got = METHOD_TABLE["ddi"].scorer(module, up, down, Weight(w0), t=module.r, options=options, xp=np)
        delta = module.scale * (up @ down)
        s, o, m = dense_ddi(w0, delta, module.r)
        raw = np.linalg.norm(delta) / (np.linalg.norm(w0) + EPS)
        assert got.finite and got.sharpness == pytest.approx(s, rel=1e-9)
        assert got.deviation == pytest.approx(o, rel=1e-6, abs=1e-9)
        assert got.magnitude_norm == pytest.approx(m, rel=1e-9)
        assert got.ddi == pytest.approx(s * o * (raw if magnitude == "raw" else m), rel=1e-6, abs=1e-12)
        assert got.ddi_norm == pytest.approx(got.ddi / (1 + got.ddi), rel=1e-12)


def test_the_ablation_multiplies_the_chosen_components():
    module, up, down, w0 = next(cases())
    full = METHOD_TABLE["ddi"].scorer(module, up, down, Weight(w0), t=4, options=ScanOptions(), xp=np)
    only = METHOD_TABLE["ddi"].scorer(module, up, down, Weight(w0), t=4, options=ScanOptions(components=("S", "O")),
                                      xp=np)
    assert only.ddi == pytest.approx(full.sharpness * full.deviation, rel=1e-12)
    assert components({"M"}, sharpness=2.0, deviation=3.0, magnitude=5.0) == 5.0
    with pytest.raises(ValueError):
        components(set(), sharpness=1.0, deviation=1.0, magnitude=1.0)


def test_safelora_scorer_matches_the_dense_cosine():
    from safetensors.numpy import load_file
    import ml_dtypes  # noqa: F401  (safetensors reads bfloat16 through it)

    unaligned = load_file(UNALIGNED)
    options = ScanOptions(method="safelora", aligned=BASE, unaligned=UNALIGNED)
    for module, up, down, w0 in cases():
        diff = w0 - unaligned[module.base_key].astype(np.float64)
        got = METHOD_TABLE["safelora"].scorer(module, up, down, Weight(diff), t=module.r, options=options, xp=np)
        delta = module.scale * (up @ down)
        projected = diff @ (diff.T @ delta) / np.linalg.norm(diff)  # C ΔW, C = A Aᵀ / ‖A‖_F
        cosine = np.sum(projected * delta) / (np.linalg.norm(projected) * np.linalg.norm(delta))
        assert got.cosine == pytest.approx(cosine, rel=1e-6)


def row(name, **scores):
    fields = dict(name=name, base_key=name, kind="q", block=0, layout="linear", d=2, k=2, r=1, t=1, scale=1.0,
                  scale_source="", transposed=False, dora=False)
    return ModuleScore(**fields, finite=all(math.isfinite(v) for v in scores.values()), **scores)


def test_the_table_says_which_end_is_suspect():
    assert SCORES == {"ddi": ("ddi", "DDI", False), "safelora": ("cosine", "cosine", True),
                      "splora": ("ediem", "E-DIEM", False)}
    low, high = row("a", cosine=0.1, ddi=0.1, ediem=0.1), row("b", cosine=0.9, ddi=0.9, ediem=0.9)
    assert suspicion(low, "safelora") > suspicion(high, "safelora")  # SafeLoRA: the lowest cosine
    assert suspicion(high, "ddi") > suspicion(low, "ddi") and suspicion(high, "splora") > suspicion(low, "splora")
    assert score(high, "splora") == 0.9 and suspicion(row("c", ddi=math.nan), "ddi") == 0.0
