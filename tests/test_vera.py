"""ddiscan against VeRA adapters written by PEFT itself (issue 16, item 3).

PEFT's ``VeraConfig(save_projection=True)`` saves one shared ``base_model.vera_A`` /
``vera_B`` and per module ``vera_lambda_b`` / ``vera_lambda_d``; its layer's
``get_delta_weight`` is (λ_b ⊙ vera_B[:out]) @ (λ_d ⊙ vera_A[:, :in]). The reference here is
that formula on PEFT's own tensors in float64, checked against ``get_delta_weight``.
"""

from __future__ import annotations

import json
import math
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import PeftModel, VeraConfig, get_peft_model  # noqa: E402
from peft.tuners.vera import VeraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from test_real_peft import SCORE_FIELDS, reference_scores, tiny_llama, train_causal_lm  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.cli import cli  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _layers(model) -> dict:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, VeraLayer)}


def _delta64(layer) -> torch.Tensor:
    """PEFT's get_delta_weight, on its own tensors in float64."""
    a, b = layer.vera_A["default"].double(), layer.vera_B["default"].double()
    lambda_b, lambda_d = layer.vera_lambda_b["default"].double(), layer.vera_lambda_d["default"].double()
    return (lambda_b[:, None] * b[: layer.out_features]) @ (lambda_d[:, None] * a[:, : layer.in_features])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vera")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = get_peft_model(base, VeraConfig(r=4, target_modules=TARGETS, save_projection=True, vera_dropout=0.0))
    train_causal_lm(model, vocab=100)
    model.save_pretrained(root / "adapter")
    return root, model


def test_the_reference_is_peft_get_delta_weight(trained):
    _, model = trained
    for name, layer in _layers(model).items():
        peft = layer.get_delta_weight("default").double()
        torch.testing.assert_close(peft, _delta64(layer), rtol=0, atol=1e-6)
        assert peft.abs().max() > 0, name


def test_exact_scores_equal_peft_delta_to_1e_6(trained):
    root, model = trained
    report = ddiscan.scan(root / "base", root / "adapter", exact=True)
    layers = _layers(model)
    assert {m.name for m in report.modules} == set(layers)
    assert len({(m.d, m.k) for m in report.modules}) == 4  # q, v, up, down: each its slice of vera_A/vera_B
    for m in report.modules:
        layer = layers[m.name]
        want = reference_scores(_delta64(layer).detach().numpy(), layer.get_base_layer().weight.detach().double().numpy(),
                                t=4)
        assert (m.r, m.scale, m.d, m.k) == (4, 1.0, layer.out_features, layer.in_features)
        for field in SCORE_FIELDS + ("delta_norm", "base_norm"):
            assert math.isclose(getattr(m, field), want[field], rel_tol=1e-6, abs_tol=1e-12), (m.name, field)


def _load(base_dir, adapter_dir):
    base = LlamaForCausalLM.from_pretrained(base_dir, local_files_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    complaints = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    return model.eval(), complaints


def test_pruned_adapter_loads_in_peft_and_merges_to_w0(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(root / "base"), str(root / "adapter"), "--top", "3", "-o", str(out),
                                      "--report-out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    pruned = set(json.loads((tmp_path / "r.json").read_text())["selection"]["pruned"])
    assert len(pruned) == 3
    original = load_file(root / "adapter" / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert set(written) == set(original)
    for key in ("base_model.vera_A", "base_model.vera_B"):  # the shared projections are never touched
        assert torch.equal(written[key], original[key])
    model, complaints = _load(root / "base", out)
    assert complaints == []
    merged = model.merge_and_unload().state_dict()
    full = _load(root / "base", root / "adapter")[0].merge_and_unload().state_dict()
    base = LlamaForCausalLM.from_pretrained(root / "base", local_files_only=True).state_dict()
    for name in _layers(trained[1]):
        key = name + ".weight"
        if name in pruned:
            assert torch.equal(merged[key], base[key]) and not torch.equal(full[key], base[key]), key
        else:
            assert torch.equal(merged[key], full[key]), key


def test_drop_mode_is_refused_in_one_line(trained, tmp_path):
    root, _ = trained
    result = CliRunner().invoke(cli, ["prune", str(root / "base"), str(root / "adapter"), "--top", "1", "--mode", "drop",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert "VeRA" in line and "--mode zero" in line


def test_without_the_shared_projection_it_is_refused_naming_the_option(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, VeraConfig(r=4, target_modules=TARGETS, save_projection=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter")
    assert not any("vera_A" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "base"), str(tmp_path / "adapter")])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert "save_projection=True" in line and "vera_A" in line


def test_gpt2_conv1d_modules_are_read_in_their_stored_orientation(tmp_path):
    """GPT-2's Conv1D stores W0 as in × out (fan_in_fan_out): VeRA's ΔW is still
    out × in, sliced by the module's in- and out-features."""
    from test_real_peft import tiny_gpt2

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                vera_dropout=0.0))
    train_causal_lm(model, vocab=100)
    model.save_pretrained(tmp_path / "adapter")
    report = ddiscan.scan(tmp_path / "base", tmp_path / "adapter", exact=True)
    layers = _layers(model)
    assert {m.name for m in report.modules} == set(layers)
    for m in report.modules:
        layer = layers[m.name]
        delta = _delta64(layer).detach()
        torch.testing.assert_close(layer.get_delta_weight("default").double().T, delta, rtol=0, atol=1e-6)
        want = reference_scores(delta.numpy(), layer.get_base_layer().weight.detach().double().numpy().T, t=4)
        assert (m.d, m.k) == (layer.out_features, layer.in_features)
        for field in SCORE_FIELDS + ("delta_norm", "base_norm"):
            assert math.isclose(getattr(m, field), want[field], rel_tol=1e-6, abs_tol=1e-12), (m.name, field)
