"""ddiscan against MLX-LM adapters trained by mlx-lm itself (issue 16, item 1).

A tiny Llama is built from ``mlx_lm.models.llama.ModelArgs`` and saved by mlx-lm's own
``save_model`` (the MLX-format base); the same weights are saved by transformers'
``save_pretrained`` (the Hugging Face base). ``mlx_lm.tuner.utils.linear_to_lora_layers``
wraps its layers in LoRALinear / DoRALinear, a few Adam steps train them, and the adapter
is saved as ``mlx_lm lora`` saves it: ``dict(tree_flatten(model.trainable_parameters()))``
through ``mx.save_safetensors`` (mlx_lm/tuner/trainer.py) and ``save_config(vars(args))``
(mlx_lm/lora.py). The reference ΔW is mlx-lm's own: ``LoRALinear.fuse`` computes
``weight + (scale · lora_bᵀ) @ lora_aᵀ`` (mlx_lm/tuner/lora.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.lora import CONFIG_DEFAULTS  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from mlx_lm.utils import save_config, save_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.cli import cli  # noqa: E402
from test_real_peft import reference_scores, SCORE_FIELDS  # noqa: E402

ARGS = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64, tie_word_embeddings=False)
RANK, SCALE = 4, 10.0


def _model():
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**ARGS))
    mx.eval(model.parameters())
    return model


def _hf_base(model, directory: Path) -> None:
    """The same weights as a transformers LlamaForCausalLM, saved with save_pretrained."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    hf.save_pretrained(directory)


def _train(model, steps: int = 3) -> None:
    optimizer = optim.Adam(learning_rate=2e-2)
    step = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    x, y = mx.random.randint(0, 64, (2, 8)), mx.random.randint(0, 64, (2, 8))
    for _ in range(steps):
        _, grads = step(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


def _save_adapter(model, directory: Path, fine_tune_type: str) -> None:
    """As ``mlx_lm lora --model <the MLX base>`` saves: its config (vars(args)) and the
    trainable parameters."""
    directory.mkdir(parents=True)
    args = dict(CONFIG_DEFAULTS, model=str(directory.parent / "mlx-base"), fine_tune_type=fine_tune_type, num_layers=2,
                adapter_path=str(directory),
                lora_parameters=None if fine_tune_type == "full" else {"rank": RANK, "scale": SCALE, "dropout": 0.0})
    save_config(args, directory / "adapter_config.json")
    mx.save_safetensors(str(directory / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))


def _layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def _delta64(layer) -> np.ndarray:
    """mlx-lm's ΔW of a LoRALinear/DoRALinear, (scale · lora_bᵀ) @ lora_aᵀ, in float64."""
    a, b = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    return layer.scale * (b.T @ a.T)


@pytest.fixture(scope="module", params=["lora", "dora"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mlx-{request.param}")
    model = _model()
    save_model(root / "mlx-base", model)
    _hf_base(model, root / "hf-base")
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": RANK, "scale": SCALE, "dropout": 0.0},
                          use_dora=request.param == "dora")
    _train(model)
    _save_adapter(model, root / "adapter", request.param)
    return root, model


def test_the_reference_is_mlx_lms_own_merge(trained):
    _, model = trained
    for name, layer in _layers(model).items():
        if isinstance(layer, LoRALinear):
            fused = np.array(layer.fuse().weight, np.float64) - np.array(layer.linear.weight, np.float64)
            np.testing.assert_allclose(fused, _delta64(layer), rtol=0, atol=1e-5)
        assert np.abs(np.array(layer.lora_b)).max() > 0, name  # trained: lora_b left zero


@pytest.mark.parametrize("base", ["mlx-base", "hf-base"])
def test_exact_scores_equal_a_float64_reference(trained, base):
    root, model = trained
    report = ddiscan.scan(root / base, root / "adapter", exact=True)
    layers = _layers(model)
    assert {m.name for m in report.modules} == set(layers)
    for m in report.modules:
        layer = layers[m.name]
        want = reference_scores(_delta64(layer), np.array(layer.linear.weight, np.float64), t=RANK)
        assert m.layout == "linear" and (m.r, m.scale) == (RANK, SCALE)
        assert "lora_parameters.scale=10" in m.scale_source
        for field in SCORE_FIELDS + ("delta_norm", "base_norm"):
            assert math.isclose(getattr(m, field), want[field], rel_tol=1e-6, abs_tol=1e-12), (m.name, field)


def test_the_orientation_is_the_grammars_even_for_square_modules(trained):
    """q_proj and o_proj are 32 × 32: lora_a · lora_b and its transpose both fit; only the
    key grammar says which ΔW is mlx-lm's."""
    root, model = trained
    report = ddiscan.scan(root / "mlx-base", root / "adapter", exact=True)
    square = [m for m in report.modules if m.d == m.k]
    assert square
    for m in square:
        layer = _layers(model)[m.name]
        assert math.isclose(m.delta_norm, float(np.linalg.norm(_delta64(layer))), rel_tol=1e-9)
        w0 = np.array(layer.linear.weight, np.float64)
        wrong = reference_scores(_delta64(layer).T, w0, t=RANK)
        assert not math.isclose(m.deviation, wrong["deviation"], rel_tol=1e-3), m.name


def _merged(model, name) -> np.ndarray:
    layer = dict(model.named_modules())[name]
    return np.array(layer.fuse().weight, np.float64)


def _load_pruned(root: Path, output: Path):
    """mlx-lm's loader on a fresh copy of the base: every key of the file must be one of the
    model's adapter parameters with its shape (load_adapters raises otherwise)."""
    model = _model()
    model.freeze()
    load_adapters(model, str(output))
    return model


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_pruned_adapter_loads_in_mlx_lm_and_merges_to_w0(trained, tmp_path, mode):
    root, model = trained
    out = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(root / "mlx-base"), str(root / "adapter"), "--top", "3",
                                      "--mode", mode, "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    pruned = json.loads((out / "adapter_config.json").read_text())
    assert pruned == json.loads((root / "adapter" / "adapter_config.json").read_text())
    from safetensors.numpy import load_file
    written = load_file(out / "adapters.safetensors")
    original = dict(tree_flatten(model.trainable_parameters()))
    loaded = _load_pruned(root, out)
    names = set(json.loads(load_file_meta(out)["ddiscan.pruned"]))
    assert len(names) == 3
    expected = {k for k in original if mode == "zero" or k.rsplit(".", 1)[0] not in names}
    assert set(written) == expected
    base = dict(tree_flatten(_model().parameters()))
    for name in _layers(model):
        merged = _merged(loaded, name)
        if name in names:
            np.testing.assert_allclose(merged, np.array(base[name + ".weight"], np.float64), rtol=0, atol=1e-6)
        else:
            np.testing.assert_allclose(merged, _merged(model, name), rtol=0, atol=1e-6)


def load_file_meta(directory: Path) -> dict:
    from safetensors import safe_open
    with safe_open(directory / "adapters.safetensors", "np") as f:
        return f.metadata()


def test_check_scans_an_mlx_adapter(trained, tmp_path):
    root, _ = trained
    adapter = root / "adapter"
    for given in (adapter, adapter / "adapters.safetensors", adapter / "adapter_config.json"):
        result = CliRunner().invoke(cli, ["check", "--base", str(root / "mlx-base"), "--max-ddi", "1e-12", str(given)])
        assert result.exit_code == 1, result.output
        assert "adapters.safetensors:1: model.layers.1.self_attn.q_proj: DDI" in result.stdout
        assert "passed over" not in result.stderr


def test_the_base_is_the_configs_model(trained):
    """mlx_lm lora records its --model in adapter_config.json: the base looked up offline."""
    root, _ = trained
    found = ddiscan.find_base(root / "adapter")
    assert Path(found.path) == root / "mlx-base"
    result = CliRunner().invoke(cli, ["report", str(root / "adapter"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inputs"]["base"]["path"].startswith(str(root / "mlx-base"))


def test_a_config_whose_rank_disagrees_is_refused(trained, tmp_path):
    root, _ = trained
    copy = tmp_path / "adapter"
    copy.mkdir()
    (copy / "adapters.safetensors").write_bytes((root / "adapter" / "adapters.safetensors").read_bytes())
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    (copy / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["report", str(root / "mlx-base"), str(copy)])
    assert result.exit_code != 0
    (line,) = result.stderr.splitlines()
    assert "lora_parameters.rank=8" in line and "rank 4" in line
    config["lora_parameters"] = {"rank": 4}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["report", str(root / "mlx-base"), str(copy)])
    (line,) = result.stderr.splitlines()
    assert result.exit_code != 0 and "'lora_parameters' must be an object" in line


def test_an_mlx_embedding_is_read_in_its_own_orientation(tmp_path):
    """mlx-lm's LoRAEmbedding (lora_a num_embeddings × r, lora_b r × dims) merges
    weight + scale·lora_a·lora_b (its fuse): not transposed, unlike its LoRALinear."""
    from mlx_lm.tuner.lora import LoRAEmbedding

    model = _model()
    save_model(tmp_path / "mlx-base", model)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": RANK, "scale": SCALE, "dropout": 0.0,
                                     "keys": ["self_attn.q_proj", "model.embed_tokens"]})
    _train(model)
    _save_adapter(model, tmp_path / "adapter", "lora")
    layer = model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding)
    delta = SCALE * (np.array(layer.lora_a, np.float64) @ np.array(layer.lora_b, np.float64))
    fused = np.array(layer.fuse().weight, np.float64) - np.array(layer.embedding.weight, np.float64)
    np.testing.assert_allclose(fused, delta, rtol=0, atol=1e-5)
    report = ddiscan.scan(tmp_path / "mlx-base", tmp_path / "adapter", exact=True)
    (m,) = [m for m in report.modules if m.name == "model.embed_tokens"]
    want = reference_scores(delta, np.array(layer.embedding.weight, np.float64), t=RANK)
    assert (m.d, m.k) == (64, 32)
    for field in SCORE_FIELDS + ("delta_norm", "base_norm"):
        assert math.isclose(getattr(m, field), want[field], rel_tol=1e-6, abs_tol=1e-12), field


def test_a_full_fine_tune_is_refused_in_one_line(tmp_path):
    """``mlx_lm lora --fine-tune-type full`` unfreezes the last layers and saves their whole
    weights in adapters.safetensors: no low-rank update to score."""
    model = _model()
    save_model(tmp_path / "mlx-base", model)
    model.freeze()
    for layer in model.layers[-1:]:
        layer.unfreeze()
    _train(model, steps=1)
    _save_adapter(model, tmp_path / "adapter", "full")
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "mlx-base"), str(tmp_path / "adapter")])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert "fine_tune_type full" in line and "full fine-tune" in line
