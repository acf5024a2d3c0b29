"""LoHa and LoKr adapters written by PEFT (LoHaConfig/LoKrConfig) and LyCORIS (LohaModule/
LokrModule through ``create_lycoris`` … ``save_weights``), scored and pruned by ddiscan.

For every module, ``scan(..., exact=True)`` must equal an independent float64 reference
(numpy SVDs of the library's own ΔW — PEFT's ``get_delta_weight``, LyCORIS's forward
``get_weight`` — and of W0) to 1e-6; the core each module took is reported; pruned files
load in the library that wrote them with strict key checking, and pruned modules merge to W0.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from peft import LoHaConfig, LoKrConfig, PeftConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

import ddiscan
from ddiscan.lora import dense_delta, load_adapter, match_modules
from ddiscan.io import TensorIndex

EPS = 1e-6  # SPEC.md §1
TARGETS = ["fc1", "fc2", "conv"]


class Net(nn.Module):
    """fc1 is 48 × 64, fc2 16 × 48, conv 32 × (16 · 3 · 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 16)
        self.conv = nn.Conv2d(16, 32, 3)


def base_net(path) -> Net:
    torch.manual_seed(0)
    net = Net()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


def fresh_net(path) -> Net:
    net = Net()
    net.load_state_dict(load_file(str(path)))
    return net


def reference(delta: np.ndarray, w0: np.ndarray, t: int) -> dict[str, float]:
    """S, O, M_norm and ‖ΔW‖_F from SPEC.md §2, by numpy SVDs of the dense matrices."""
    sigma = np.linalg.svd(delta, compute_uv=False)
    energy = float(np.sum(sigma**2))
    basis = np.linalg.svd(w0, full_matrices=False)[0][:, :t]
    captured = float(np.sum((basis.T @ delta) ** 2))
    norm, base = np.sqrt(energy), np.linalg.norm(w0)
    return {"sharpness": sigma[0] ** 2 / (energy + EPS), "deviation": min(1.0, max(0.0, 1 - captured / (energy + EPS))),
            "magnitude_norm": norm / (base + norm + EPS), "delta_norm": norm}


def assert_scores(report, deltas: dict[str, np.ndarray], w0s: dict[str, np.ndarray]) -> None:
    assert {row.name for row in report.modules} == set(deltas)
    for row in report.modules:
        expected = reference(deltas[row.name], w0s[row.name], row.t)
        for field, value in expected.items():
            assert getattr(row, field) == pytest.approx(value, rel=1e-6, abs=1e-9), (row.name, field)


# ---------------------------------------------------------------------------------------
# PEFT


PEFT_CASES = {
    # fc1: r² = 9 ≤ 48/4 (khatri-rao); fc2: 9 > 16/4 (dense); conv: Tucker, rank 2 by pattern
    "loha": LoHaConfig(r=3, alpha=5, target_modules=TARGETS, init_weights=False, use_effective_conv2d=True,
                       rank_pattern={"conv": 2}, alpha_pattern={"fc2": 7}),
    "loha-flat-conv": LoHaConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "lokr": LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False, decompose_both=True,
                       use_effective_conv2d=True, alpha_pattern={"fc1": 5}),
    "lokr-full-w1": LoKrConfig(r=2, alpha=4, target_modules=TARGETS, init_weights=False, rank_pattern={"fc2": 3}),
}
PEFT_CORES = {
    "loha": {"fc1": "khatri-rao", "fc2": "dense", "conv": "khatri-rao"},
    "loha-flat-conv": {"fc1": "khatri-rao", "fc2": "khatri-rao", "conv": "khatri-rao"},
    "lokr": dict.fromkeys(TARGETS, "kronecker"),
    "lokr-full-w1": dict.fromkeys(TARGETS, "kronecker"),
}


@pytest.fixture(scope="module", params=sorted(PEFT_CASES))
def peft_adapter(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    net = base_net(root / "base.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, PEFT_CASES[request.param])
    model.save_pretrained(root / "adapter")
    model = model.double()
    deltas, w0s = {}, {}
    for name in TARGETS:
        layer = model.base_model.model.get_submodule(name)
        delta = layer.get_delta_weight("default").detach().numpy()
        deltas[name] = delta.reshape(delta.shape[0], -1)
        w0s[name] = layer.get_base_layer().weight.detach().numpy().reshape(delta.shape[0], -1)
    return request.param, root, deltas, w0s


def test_peft_exact_scores_equal_the_dense_reference(peft_adapter):
    case, root, deltas, w0s = peft_adapter
    report = ddiscan.scan(root / "base.safetensors", root / "adapter", exact=True)
    assert_scores(report, deltas, w0s)
    assert {row.name: row.core for row in report.modules} == PEFT_CORES[case]
    assert all(row.finite and row.layout in ("linear", "conv") for row in report.modules)
    assert json.loads(report.to_json())["modules"][0]["core"] == report.modules[0].core


def test_peft_delta_and_scale_are_peft_s(peft_adapter):
    case, root, deltas, _ = peft_adapter
    adapter = load_adapter(root / "adapter")
    modules, _, warns = match_modules(adapter, TensorIndex(root / "base.safetensors"))
    config = PEFT_CASES[case]
    for m in modules:
        r = config.rank_pattern.get(m.name, config.r)
        assert m.scale == pytest.approx(config.alpha_pattern.get(m.name, config.alpha) / r)
        np.testing.assert_allclose(dense_delta(m, adapter.file), deltas[m.name], rtol=1e-6, atol=1e-9)
    assert warns == []


def test_the_randomized_scan_matches_the_exact_one(peft_adapter):
    _, root, _, _ = peft_adapter
    exact = {row.name: row for row in ddiscan.scan(root / "base.safetensors", root / "adapter", exact=True).modules}
    for row in ddiscan.scan(root / "base.safetensors", root / "adapter", power_iters=6).modules:
        assert row.sharpness == pytest.approx(exact[row.name].sharpness, rel=1e-9)
        assert row.delta_norm == pytest.approx(exact[row.name].delta_norm, rel=1e-9)
        assert row.deviation == pytest.approx(exact[row.name].deviation, abs=0.02)  # a flat random spectrum


@pytest.mark.parametrize("method", ["safelora", "splora"])
def test_alignment_methods_read_loha_and_lokr(peft_adapter, method, tmp_path):
    _, root, deltas, _ = peft_adapter
    aligned = {k: v + 0.01 * torch.randn_like(v) for k, v in load_file(str(root / "base.safetensors")).items()}
    save_file(aligned, str(tmp_path / "aligned.safetensors"))
    report = ddiscan.scan(root / "base.safetensors", root / "adapter", method=method,
                          aligned=tmp_path / "aligned.safetensors", unaligned=root / "base.safetensors")
    assert {row.name for row in report.modules} == set(deltas) and all(row.finite for row in report.modules)
    for row in report.modules:
        assert row.delta_norm == pytest.approx(np.linalg.norm(deltas[row.name]), rel=1e-6)


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_peft_loads_the_pruned_adapter_and_pruned_modules_merge_to_w0(peft_adapter, mode, tmp_path):
    _, root, _, w0s = peft_adapter
    result = ddiscan.prune(root / "base.safetensors", root / "adapter", tmp_path / "out", top=1, mode=mode)
    pruned = set(result.selection.names)
    config = PeftConfig.from_pretrained(str(tmp_path / "out"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh_net(root / "base.safetensors"), config)
    loaded = set_peft_model_state_dict(model, load_peft_weights(str(tmp_path / "out")))
    assert loaded.unexpected_keys == []
    assert [k for k in loaded.missing_keys if "hada_" in k or "lokr_" in k] == []
    merged = model.merge_and_unload()
    for name in TARGETS:
        weight = merged.get_submodule(name).weight.detach().double().numpy().reshape(w0s[name].shape)
        if name in pruned:
            np.testing.assert_allclose(weight, w0s[name], rtol=0, atol=1e-7)
        else:
            assert np.abs(weight - w0s[name]).max() > 1e-4
    if mode == "drop":
        keys = load_peft_weights(str(tmp_path / "out")).keys()
        assert not any(k.startswith(f"base_model.model.{n}.") for k in keys for n in pruned)


# ---------------------------------------------------------------------------------------
# LyCORIS


def lycoris_network(net: Net, algo: str, **kwargs):
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": [], "target_name": TARGETS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_lycoris(net, 1.0, algo=algo, **kwargs)
    network.apply_to()
    return network


LYCORIS_CASES = {
    # linear_alpha ≠ linear_dim: scale 2 (LoHa), 1.5 (LoKr)
    "loha": dict(algo="loha", linear_dim=2, linear_alpha=4, conv_dim=2, conv_alpha=4),
    "loha-tucker": dict(algo="loha", linear_dim=2, linear_alpha=2, conv_dim=2, conv_alpha=2, use_tucker=True),
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=3, conv_dim=2, conv_alpha=3, decompose_both=True),
    "lokr-tucker": dict(algo="lokr", linear_dim=2, linear_alpha=2, conv_dim=2, conv_alpha=2, use_tucker=True),
}


@pytest.fixture(scope="module", params=sorted(LYCORIS_CASES))
def lycoris_adapter(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    net = base_net(root / "base.safetensors")
    network = lycoris_network(net, **LYCORIS_CASES[request.param])
    torch.manual_seed(1)
    with torch.no_grad():
        for lora in network.loras:
            for name, p in lora.named_parameters():
                p.copy_(0.3 * torch.randn_like(p))
    network.save_weights(str(root / "adapter.safetensors"), torch.float32, None)
    deltas, w0s, modules = {}, {}, {}
    with torch.no_grad():
        for lora in network.loras:
            lora.double()
            delta = lora.get_weight(lora.shape).numpy()  # what LyCORIS's forward adds (multiplier 1)
            deltas[lora.lora_name] = delta.reshape(delta.shape[0], -1)
            w0s[lora.lora_name] = lora.org_weight.double().numpy().reshape(delta.shape[0], -1)
            modules[lora.lora_name] = lora
    return request.param, root, deltas, w0s, modules


def test_lycoris_exact_scores_equal_the_dense_reference(lycoris_adapter):
    case, root, deltas, w0s, _ = lycoris_adapter
    report = ddiscan.scan(root / "base.safetensors", root / "adapter.safetensors", exact=True)
    assert_scores(report, deltas, w0s)
    kron = "kronecker" if case.startswith("lokr") else None
    assert all(row.core in ((kron,) if kron else ("khatri-rao", "dense")) for row in report.modules)
    assert {row.base_key for row in report.modules} == {f"{n}.weight" for n in TARGETS}


def test_lycoris_scale_is_the_one_its_forward_applies(lycoris_adapter):
    """LyCORIS's forward adds get_weight(shape) = scale · rebuild; its get_diff_weight (and
    merge_to) multiplies by scale once more (SPEC.md §11.3): ddiscan scores the forward's ΔW,
    which get_diff_weight equals when alpha = dim."""
    case, root, deltas, _, modules = lycoris_adapter
    x = torch.randn(3, 64, dtype=torch.float64)
    lora = modules["lycoris_fc1"]
    lora.org_module[0].double()
    with torch.no_grad():
        out = lora(x) - lora.org_forward(x)
        np.testing.assert_allclose(out.numpy(), x.numpy() @ deltas["lycoris_fc1"].T, rtol=1e-9, atol=1e-12)
        if lora.scale == 1:
            np.testing.assert_allclose(lora.get_diff_weight()[0].numpy(), deltas["lycoris_fc1"], rtol=1e-12)
    adapter = load_adapter(root / "adapter.safetensors")
    found, _, _ = match_modules(adapter, TensorIndex(root / "base.safetensors"))
    for m in found:
        assert m.scale == pytest.approx(modules[m.name].scale)


def _load_strictly(network_net, path):
    """LyCORIS's own loader (create_lycoris_from_weights), then every module it built loads
    its keys with strict=True, and every key of the file belongs to one of them."""
    from lycoris import create_lycoris_from_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network, weights = create_lycoris_from_weights(1.0, str(path), network_net)
    used = set()
    for lora in network.loras:
        own = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == lora.lora_name}
        lora.load_state_dict(own, strict=True)
        used.update(f"{lora.lora_name}.{k}" for k in own)
    assert used == set(weights)
    return network


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_lycoris_loads_the_pruned_file_and_pruned_modules_merge_to_w0(lycoris_adapter, mode, tmp_path):
    case, root, _, w0s, _ = lycoris_adapter
    out = tmp_path / "pruned.safetensors"
    result = ddiscan.prune(root / "base.safetensors", root / "adapter.safetensors", out, top=1, mode=mode)
    pruned = set(result.selection.names)
    net = fresh_net(root / "base.safetensors")
    if case == "lokr-tucker":
        # LyCORIS 4.1.3's loader cannot rebuild its own Tucker LoKr modules, pruned or not
        # (make_module_from_state_dict reads the rank from lokr_w2_a's second axis)
        with pytest.raises(AttributeError, match="lokr_w2_a"):
            _load_strictly(fresh_net(root / "base.safetensors"), root / "adapter.safetensors")
        if mode == "drop":
            return
        network = lycoris_network(net, **LYCORIS_CASES[case])
    else:
        network = _load_strictly(net, out)
        assert {lora.lora_name for lora in network.loras} == set(w0s) - (pruned if mode == "drop" else set())
    if mode == "zero":  # the training wrapper, built as before, takes the file whole
        wrapper = lycoris_network(fresh_net(root / "base.safetensors"), **LYCORIS_CASES[case])
        wrapper.load_state_dict(load_file(str(out)), strict=True)
        if case == "lokr-tucker":
            network.load_state_dict(load_file(str(out)), strict=True)
    network.merge_to(1.0)
    for name in TARGETS:
        weight = net.get_submodule(name).weight.detach().double().numpy().reshape(w0s[f"lycoris_{name}"].shape)
        if f"lycoris_{name}" in pruned:
            np.testing.assert_allclose(weight, w0s[f"lycoris_{name}"], rtol=0, atol=1e-7)
        else:
            assert np.abs(weight - w0s[f"lycoris_{name}"]).max() > 1e-4


# ---------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit, never a silent drop


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A PEFT LoHa and a PEFT LoKr adapter of one base, as plain tensors to edit."""
    root = tmp_path_factory.mktemp("bad")
    base_net(root / "base.safetensors")
    tensors = {}
    for name, config in (("loha", PEFT_CASES["loha-flat-conv"]), ("lokr", PEFT_CASES["lokr"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(fresh_net(root / "base.safetensors"), config).save_pretrained(root / name)
        tensors[name] = load_file(str(root / name / "adapter_model.safetensors"))
    return root, tensors


def _edited(tmp_path, tensors: dict, drop=(), **replace) -> str:
    edited = {k: v for k, v in tensors.items() if k not in drop}
    edited.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(edited, str(tmp_path / "edited.safetensors"))
    return str(tmp_path / "edited.safetensors")


def _fails(root, adapter, *flags) -> tuple[int, str]:
    from click.testing import CliRunner

    from ddiscan.cli import cli

    result = CliRunner().invoke(cli, ["report", str(root / "base.safetensors"), adapter, *flags])
    message = result.output.strip()
    assert result.exit_code != 0 and len(message.splitlines()) == 1 and "Traceback" not in message, message
    return result.exit_code, message


FC1 = "base_model.model.fc1."


def test_a_loha_module_without_a_factor_is_refused(peft_pair, tmp_path):
    root, tensors = peft_pair
    _, message = _fails(root, _edited(tmp_path, tensors["loha"], drop=[FC1 + "hada_w2_b"]), "--scaling", "1")
    assert "loha module fc1 lacks a factor" in message


def test_loha_halves_of_different_ranks_are_refused(peft_pair, tmp_path):
    root, tensors = peft_pair
    replace = {(FC1 + "hada_w1_b").replace(".", "__"): torch.randn(5, 64)}
    _, message = _fails(root, _edited(tmp_path, tensors["loha"], **replace), "--scaling", "1")
    assert "hada_w1_a" in message and "ranks differ" in message


def test_lokr_with_a_full_factor_and_its_factors_is_refused(peft_pair, tmp_path):
    root, tensors = peft_pair
    replace = {(FC1 + "lokr_w1").replace(".", "__"): torch.randn(6, 8)}
    _, message = _fails(root, _edited(tmp_path, tensors["lokr"], **replace), "--scaling", "1")
    assert "both lokr_w1 and its factors" in message


def test_lora_and_loha_tensors_of_one_module_are_refused(peft_pair, tmp_path):
    root, tensors = peft_pair
    replace = {(FC1 + "lora_A.weight").replace(".", "__"): torch.randn(2, 64)}
    _, message = _fails(root, _edited(tmp_path, tensors["loha"], **replace), "--scaling", "1")
    assert "mixes LoRA and loha tensors" in message


def test_a_lora_config_beside_loha_tensors_is_refused(peft_pair, tmp_path):
    root, _ = peft_pair
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes((root / "loha" / "adapter_model.safetensors").read_bytes())
    config = json.loads((root / "loha" / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA", "lora_alpha": 2}))
    _, message = _fails(root, str(directory))
    assert "peft_type LORA" in message and "loha" in message


def test_a_non_finite_loha_factor_is_a_non_finite_module(peft_pair, tmp_path):
    root, tensors = peft_pair
    bad = tensors["loha"][FC1 + "hada_w2_a"].clone()
    bad[0, 0] = float("nan")
    report = ddiscan.scan(root / "base.safetensors", _edited(tmp_path, tensors["loha"], **{
        (FC1 + "hada_w2_a").replace(".", "__"): bad}), scaling=1.0)
    assert {row.name: row.finite for row in report.modules} == {"fc1": False, "fc2": True, "conv": True}


def test_project_mode_refuses_a_loha_module(peft_pair, tmp_path):
    from ddiscan.errors import UsageError

    root, _ = peft_pair
    with pytest.raises(UsageError) as info:
        ddiscan.prune(root / "base.safetensors", root / "loha", tmp_path / "out", top=3, mode="project",
                      aligned=root / "base.safetensors", unaligned=root / "base.safetensors", method="safelora")
    assert "loha module" in str(info.value)


def test_reports_with_cores_follow_the_schema(peft_pair):
    import jsonschema

    from ddiscan.report import load_schema

    root, _ = peft_pair
    for name in ("loha", "lokr"):
        data = json.loads(ddiscan.scan(root / "base.safetensors", root / name).to_json())
        jsonschema.validate(data, load_schema())
        assert {row["core"] for row in data["modules"]} <= {"khatri-rao", "kronecker", "dense"}
