"""ddiscan.sources: every kind of base through the one WeightSource interface, against float64
references read with the safetensors library (W0, ‖W0‖, Q_t from a full SVD, A = W_a − W_u)."""

from pathlib import Path

import numpy as np
import pytest
import ml_dtypes  # noqa: F401  (safetensors reads bfloat16 into NumPy through it)
from safetensors.numpy import load_file

import ddiscan
from ddiscan import sources
from ddiscan.io.index import TensorIndex
from ddiscan.lora import load_adapter, match_modules
from ddiscan.sketch import Sketch
from ddiscan.sources import AlignmentDifference, CheckpointSource, ProfileSource, WeightSource, open_source

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
UNALIGNED = ROOT / "fixtures" / "tiny-llama-unaligned.safetensors"
EXACT = Sketch(exact=True)


def dense_base() -> dict:
    tensors = {}
    for shard in sorted(BASE.glob("*.safetensors")):
        tensors |= {k: v.astype(np.float64) for k, v in load_file(shard).items()}
    return tensors


def modules():
    return match_modules(load_adapter(ADAPTER), TensorIndex(BASE))[0]


def projector(q) -> np.ndarray:
    q = np.asarray(q, np.float64)
    return q @ q.T


def exact_projector(w: np.ndarray, t: int) -> np.ndarray:
    u = np.linalg.svd(w)[0][:, :t]
    return u @ u.T


def read(source: WeightSource, key: str):
    return source.load(key, source.fetch(key))


def test_open_source_picks_the_kind_of_base(tmp_path):
    assert isinstance(open_source(BASE, sketch=EXACT), CheckpointSource)
    profile = tmp_path / "base.ddiprofile"
    ddiscan.build_profile(BASE, profile, max_t=8, exact=True)
    assert isinstance(open_source(profile, sketch=EXACT), ProfileSource)
    both = open_source(BASE, sketch=EXACT, aligned=BASE, unaligned=UNALIGNED)
    assert isinstance(both, AlignmentDifference)


def test_a_new_kind_of_base_is_one_registration(monkeypatch):
    """KINDS is the registry the loop never looks past: a kind put first opens the base."""
    class Marker(CheckpointSource):
        @classmethod
        def accept(cls, base, sketch):
            return cls(TensorIndex(base), sketch) if str(base).endswith("tiny-llama") else None

    monkeypatch.setattr(sources, "KINDS", (Marker, *sources.KINDS))
    assert type(open_source(BASE, sketch=EXACT)) is Marker
    assert type(open_source(BASE / "model.safetensors.index.json", sketch=EXACT)) is CheckpointSource


def test_checkpoint_reads_w0_its_norm_and_its_exact_basis():
    dense = dense_base()
    source = open_source(BASE, sketch=EXACT)
    keys = [m.base_key for m in modules()]
    order = source.order(keys)
    assert sorted(order) == sorted(keys)
    assert order == sorted(keys, key=lambda k: (str(source.index.weight_map[k]), source.info(k).start))
    for module in modules():
        matrix, norm = read(source, module.base_key)
        reference = dense[module.base_key]
        np.testing.assert_array_equal(np.asarray(matrix, np.float64), reference)  # bf16 widens exactly
        assert norm == pytest.approx(np.linalg.norm(reference), rel=1e-6)
        q = source.basis(module.base_key, matrix, module=module, t=module.r, xp=np).basis
        np.testing.assert_allclose(projector(q), exact_projector(reference, module.r), atol=1e-5)


def test_a_profile_gives_the_same_norm_and_subspace_without_the_weights(tmp_path):
    profile = tmp_path / "base.ddiprofile"
    ddiscan.build_profile(BASE, profile, max_t=8, exact=True)
    source, checkpoint = open_source(profile, sketch=EXACT), open_source(BASE, sketch=EXACT)
    for module in modules():
        matrix, norm = read(source, module.base_key)
        w0, w0_norm = read(checkpoint, module.base_key)
        assert matrix is None and norm == pytest.approx(w0_norm, rel=1e-6)
        q = source.basis(module.base_key, matrix, module=module, t=module.r, xp=np).basis
        ref = checkpoint.basis(module.base_key, w0, module=module, t=module.r, xp=np).basis
        np.testing.assert_allclose(projector(q), projector(ref), atol=1e-5)
    parameters, notes = source.settle({"exact": False, "oversample": 8, "sketch": "krylov", "krylov_iters": 4,
                                          "power_iters": 4, "seed": 0})
    assert parameters["exact"] is True and notes  # the profile's own sketch, and a note that says so


def test_the_alignment_difference_is_w_aligned_minus_w_unaligned():
    dense = dense_base()
    unaligned = {k: v.astype(np.float64) for k, v in load_file(UNALIGNED).items()}
    source = open_source(BASE, sketch=EXACT, aligned=BASE, unaligned=UNALIGNED)
    for module in modules():
        diff, norm = read(source, module.base_key)
        reference = dense[module.base_key] - unaligned[module.base_key]
        np.testing.assert_allclose(np.asarray(diff, np.float64), reference, rtol=0, atol=1e-7)
        assert norm == pytest.approx(np.linalg.norm(reference), rel=1e-5)
        q = source.basis(module.base_key, diff, module=module, t=2, xp=np).basis
        np.testing.assert_allclose(projector(q), exact_projector(reference, 2), atol=1e-4)
