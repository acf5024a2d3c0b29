"""Adapter formats beyond plain LoRA, each written by the real tool (issue #13).

* AdaLoRA (PEFT ``AdaLoraConfig``): ΔW = B·diag(E)·A · lora_alpha / (init_r + 1e-5), checked
  against PEFT's own ``get_delta_weight``; zero rows of E; pruning removes the update.
* diffusers before PEFT (``LoRACompatibleLinear`` / ``LoRACompatibleConv`` saved with
  ``diffusers.training_utils.unet_lora_state_dict``): ``.lora.down`` / ``.lora.up``, conv
  included, and the attention-processor spelling ``processor.to_q_lora.down``.
* Non-LoRA adapters (PEFT LoHa, LoKr, IA3, VeRA, OFT, BOFT; LyCORIS LoHa/LoKr) are refused by
  name; LoRA pairs mixed with them are an error, or a counted warning with allow_unmatched.
* ``lora_bias=True``: lora_B.bias belongs to its module, and prune removes it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import (  # noqa: E402
    AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel,
    get_peft_model,
)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_real_peft import PEFT_PREFIX, assert_close, reference_scores, tiny_llama  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.cli import cli  # noqa: E402
from ddiscan.errors import MatchError, NoLoraPairs  # noqa: E402
from ddiscan.io import TensorIndex  # noqa: E402
from ddiscan.lora import base_matrix, dense_delta, module_keys  # noqa: E402
from ddiscan.io.reader import SafetensorsFile  # noqa: E402


def _keys(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _matched(base, adapter, **kwargs):
    adapter = ddiscan.lora.load_adapter(adapter)
    index = TensorIndex(base)
    return (adapter, index, *ddiscan.lora.match_modules(adapter, index, **kwargs))


# ---------------------------------------------------------------------------------------
# AdaLoRA


ADALORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adalora(tmp_path: Path, *, init_r: int, r: int = 8, zero_rows=(1, 4)):
    """A tiny LLaMA with AdaLoRA, E set to nonzero values (PEFT initialises it to 0) with
    the ranks in ``zero_rows`` zero, as AdaLoRA's budget masks them; saved by PEFT."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = AdaLoraConfig(init_r=init_r, target_r=2, r=r, lora_alpha=16, total_step=10,
                           target_modules=ADALORA_TARGETS)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_E") and "default" in module.lora_E:
                e = torch.randn(init_r, 1, generator=generator) * 3.0
                e[list(zero_rows)] = 0.0
                module.lora_E["default"].copy_(e)
    model.save_pretrained(tmp_path / "adapter")
    layers = {n.removeprefix(PEFT_PREFIX): m for n, m in model.named_modules()
              if hasattr(m, "lora_E") and "default" in m.lora_E}
    assert len(layers) == 2 * len(ADALORA_TARGETS)
    return tmp_path / "base", tmp_path / "adapter", layers


@pytest.mark.parametrize("init_r, r", [(6, 8), (8, 8)])
def test_adalora_delta_is_peft_get_delta_weight(tmp_path, init_r, r):
    base, adapter_dir, layers = _adalora(tmp_path, init_r=init_r, r=r)
    adapter, index, modules, skipped, _ = _matched(base, adapter_dir)
    assert {m.name for m in modules} == set(layers)
    assert not any("lora_E" in s.key for s in skipped)
    for m in modules:
        layer = layers[m.name]
        assert m.singular_key and m.singular_key.endswith("lora_E")
        assert m.scale == pytest.approx(16 / (init_r + 1e-5), rel=1e-12)
        peft_delta = layer.get_delta_weight("default").detach().double().numpy()
        assert np.linalg.norm(peft_delta) > 1e-3
        assert_close(dense_delta(m, adapter.file), peft_delta, what=f"{m.name}: ΔW vs get_delta_weight")


def test_adalora_exact_scan_matches_dense_reference(tmp_path):
    base, adapter_dir, layers = _adalora(tmp_path, init_r=6)
    report = ddiscan.scan(base, adapter_dir, exact=True)
    index = TensorIndex(base)
    assert {s.name for s in report.modules} == set(layers)
    for s in report.modules:
        delta = layers[s.name].get_delta_weight("default").detach().double().numpy()
        w0 = np.asarray(index.array(s.name + ".weight"), dtype=np.float64)
        want = reference_scores(delta, w0, t=6)
        for field in ("sharpness", "deviation", "magnitude", "ddi", "delta_norm"):
            assert math.isclose(getattr(s, field), want[field], rel_tol=1e-5, abs_tol=1e-9), (s.name, field)


def test_adalora_rank_pattern_pruned_ranks(tmp_path):
    """After AdaLoRA's final budget step PEFT saves a rank_pattern and only the kept ranks;
    ranknum stays init_r. ddiscan must equal PEFT's reload of that file."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=16, total_step=10, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_E") and "default" in module.lora_E:
                module.lora_E["default"].copy_(torch.arange(1.0, 7.0).reshape(6, 1))
    keep = [True, False, True, True, False, False]
    model.peft_config["default"].rank_pattern = {
        f"model.layers.{i}.self_attn.{p}.lora_E.default": list(keep) for i in range(2) for p in ("q_proj", "v_proj")
    }
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    layers = {n.removeprefix(PEFT_PREFIX): m for n, m in reloaded.named_modules()
              if hasattr(m, "lora_E") and "default" in m.lora_E}
    adapter, _, modules, _, _ = _matched(tmp_path / "base", tmp_path / "adapter")
    assert {m.name for m in modules} == set(layers)
    for m in modules:
        assert m.r == 3
        assert_close(dense_delta(m, adapter.file), layers[m.name].get_delta_weight("default").detach().double().numpy(),
                     what=m.name)


def test_adalora_prune_zero_removes_the_update(tmp_path):
    base, adapter_dir, _ = _adalora(tmp_path, init_r=6)
    keys = module_keys(SafetensorsFile(adapter_dir / "adapter_model.safetensors"))
    assert all(any(k.endswith("lora_E") for k in v["factors"]) for v in keys.values())
    out = tmp_path / "pruned"
    result = ddiscan.prune(base, adapter_dir, out, top=2, mode="zero")
    pruned = set(result.selection.names)
    assert len(pruned) == 2
    reloaded = PeftModel.from_pretrained(tiny_llama(), out).eval()
    for name, module in reloaded.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            delta = module.get_delta_weight("default").detach()
            assert (float(delta.abs().max()) == 0.0) == (name.removeprefix(PEFT_PREFIX) in pruned), name


def test_adalora_without_config_is_refused(tmp_path):
    base, adapter_dir, _ = _adalora(tmp_path, init_r=6)
    with pytest.raises(ddiscan.errors.InputError) as info:
        ddiscan.scan(base, _bare(tmp_path, adapter_dir))
    assert "AdaLoRA" in str(info.value)


def _bare(tmp_path: Path, adapter_dir: Path) -> Path:
    """The adapter's tensors alone, without adapter_config.json."""
    path = tmp_path / "bare" / "lora.safetensors"
    path.parent.mkdir()
    save_file(_keys(adapter_dir / "adapter_model.safetensors"), str(path))
    return path


# ---------------------------------------------------------------------------------------
# diffusers before PEFT: .lora.down / .lora.up


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def _diffusers_lora(tmp_path: Path, *, network_alpha=None, rank: int = 2):
    """Old-format diffusers LoRA on every attention projection and the resnets' conv1,
    saved with diffusers' own unet_lora_state_dict; returns (base, adapter, {name: ΔW})."""
    from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear, LoRAConv2dLayer, LoRALinearLayer
    from diffusers.training_utils import unet_lora_state_dict

    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(7)
    targets = [(n, m) for n, m in unet.named_modules()
               if (isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
                   and ".attn" in n) or (isinstance(m, torch.nn.Conv2d) and n.endswith("conv1"))]
    assert any(isinstance(m, torch.nn.Conv2d) for _, m in targets)
    replaced = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, old in targets:
            if isinstance(old, torch.nn.Linear):
                new = LoRACompatibleLinear(old.in_features, old.out_features, bias=old.bias is not None)
                new.set_lora_layer(LoRALinearLayer(old.in_features, old.out_features, rank, network_alpha))
            else:
                new = LoRACompatibleConv(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
                new.set_lora_layer(LoRAConv2dLayer(old.in_channels, old.out_channels, rank, old.kernel_size,
                                                   old.stride, old.padding, network_alpha))
            new.load_state_dict(old.state_dict(), strict=False)
            with torch.no_grad():
                new.lora_layer.up.weight.normal_(generator=generator)
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, new)
            replaced[name] = new
        state = {f"unet.{k}": v.contiguous() for k, v in unet_lora_state_dict(unet).items()}
        deltas = {}
        for name, module in replaced.items():
            before = module.weight.detach().double().clone()
            module._fuse_lora(lora_scale=1.0)
            deltas[name] = (module.weight.detach().double() - before).reshape(before.shape[0], -1).numpy()
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(adapter))
    return tmp_path / "base", adapter, deltas


def test_diffusers_old_format_linear_and_conv(tmp_path):
    base, adapter, deltas = _diffusers_lora(tmp_path)
    assert any(".lora.down.weight" in k and k.endswith("conv1.lora.down.weight") for k in _keys(adapter))
    file, index, modules, skipped, _ = _matched(base, adapter)
    assert skipped == []
    assert {m.base_key for m in modules} == {n + ".weight" for n in deltas}
    assert {m.layout for m in modules} == {"linear", "conv"}
    for m in modules:
        assert m.scale == 1.0
        assert_close(dense_delta(m, file.file), deltas[m.base_key.removesuffix(".weight")], what=m.name, rtol=1e-5)
        assert base_matrix(m, index).shape == (m.d, m.k)


def test_diffusers_old_format_with_alpha(tmp_path):
    base, adapter, deltas = _diffusers_lora(tmp_path, network_alpha=1.0, rank=4)
    tensors = _keys(adapter)
    for key in [k for k in tensors if k.endswith(".lora.down.weight")]:
        tensors[key.removesuffix(".lora.down.weight") + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(adapter))
    file, _, modules, _, warnings_ = _matched(base, adapter)
    assert not any("scaling s = 1 assumed" in w for w in warnings_)
    for m in modules:
        assert m.scale == pytest.approx(0.25)
        assert_close(dense_delta(m, file.file), deltas[m.base_key.removesuffix(".weight")], what=m.name)


def test_diffusers_attention_processor_keys(tmp_path):
    """diffusers' AttnProcsLayers spelling (loaders/unet.py, ``{name}.to_q_lora.down.weight``
    under ``…attn1.processor``; state_dict_utils.UNET_TO_DIFFUSERS maps ``.to_out_lora`` to
    ``.to_out.0``), built from the file diffusers wrote."""
    base, adapter, deltas = _diffusers_lora(tmp_path)
    renamed = {}
    for key, value in _keys(adapter).items():
        for proj, spelled in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            if f".{proj}.lora." in key:
                key = key.replace(f".{proj}.lora.", f".processor.{spelled}_lora.")
        renamed[key] = value
    assert any(".processor.to_out_lora.up.weight" in k for k in renamed)
    save_file(renamed, str(adapter))
    file, _, modules, skipped, _ = _matched(base, adapter)
    assert skipped == []
    assert {m.base_key for m in modules} == {n + ".weight" for n in deltas}
    for m in modules:
        assert_close(dense_delta(m, file.file), deltas[m.base_key.removesuffix(".weight")], what=m.name)


def test_unknown_lora_layout_is_never_dropped_silently(tmp_path):
    base, adapter, _ = _diffusers_lora(tmp_path)
    tensors = _keys(adapter)
    tensors["unet.mid_block.attentions.0.proj_in.lora_mid.weight"] = torch.ones(2, 2)
    save_file(tensors, str(adapter))
    with pytest.raises(MatchError) as info:
        _matched(base, adapter)
    assert "lora_mid" in str(info.value) and "1 tensor(s)" in str(info.value)
    _, _, modules, skipped, warnings_ = _matched(base, adapter, allow_unmatched=True)
    assert modules
    assert any("1 tensor(s) ddiscan cannot read" in w for w in warnings_)
    assert [s.key for s in skipped] == ["unet.mid_block.attentions.0.proj_in.lora_mid.weight"]


# ---------------------------------------------------------------------------------------
# Non-LoRA adapters


NON_LORA = {
    "IA3": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
    "OFT": (OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]), "OFT"),
    "BOFT": (BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]), "BOFT"),
}


@pytest.fixture(scope="module")
def non_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("non_lora")
    tiny_llama().save_pretrained(root / "base")
    for peft_type, (config, _) in NON_LORA.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(tiny_llama(), config).save_pretrained(root / peft_type)
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["k_proj"])).save_pretrained(root / "lora")
    get_peft_model(tiny_llama(), LoHaConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(root / "LOHA")
    return root


@pytest.mark.parametrize("peft_type", sorted(NON_LORA))
def test_non_lora_peft_adapter_named_in_one_line(non_lora, peft_type, tmp_path):
    directory = non_lora / peft_type
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == peft_type
    result = CliRunner().invoke(cli, ["report", str(non_lora / "base"), str(directory)])
    assert result.exit_code == 3, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert peft_type in message and "not supported" in message
    # the tensors alone (no adapter_config.json): the method is named from the key names
    with pytest.raises(NoLoraPairs) as info:
        ddiscan.scan(non_lora / "base", _bare(tmp_path, directory))
    assert NON_LORA[peft_type][1] in str(info.value) and "not supported" in str(info.value)


def test_lora_and_loha_modules_of_one_file_are_each_scored_by_their_core(non_lora, tmp_path):
    tensors = {**_keys(non_lora / "lora" / "adapter_model.safetensors"),
               **_keys(non_lora / "LOHA" / "adapter_model.safetensors")}
    adapter = tmp_path / "mixed.safetensors"
    save_file(tensors, str(adapter))
    report = ddiscan.scan(non_lora / "base", adapter, scaling=1.0)
    cores = {m.name.rsplit(".", 1)[-1]: m.core for m in report.modules}
    # v_proj is 32 × 64: r² = 16 > 32 / 4, so its ΔW is scored densely
    assert cores == {"k_proj": "lora", "q_proj": "khatri-rao", "v_proj": "dense"} and len(report.modules) == 6


CORES = {"loha": "khatri-rao", "lokr": "kronecker"}


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_adapter_is_read(non_lora, tmp_path, algo):
    from lycoris import LycorisNetwork, create_lycoris

    model = tiny_llama()
    LycorisNetwork.apply_preset({"target_name": [".*q_proj", ".*v_proj"]})
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo)
    network.apply_to()
    adapter = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(adapter), torch.float32, None)
    report = ddiscan.scan(non_lora / "base", adapter)
    assert report.modules and {m.core for m in report.modules} <= {CORES[algo], "dense"}
    assert {m.base_key for m in report.modules} >= {"model.layers.0.self_attn.q_proj.weight"}


# ---------------------------------------------------------------------------------------
# lora_bias=True


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_prune_removes_lora_bias(tmp_path, mode):
    base_model = tiny_llama(attention_bias=True)
    base_model.save_pretrained(tmp_path / "base")
    model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=generator)
    model.save_pretrained(tmp_path / "adapter")
    keys = module_keys(SafetensorsFile(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(any(k.endswith("lora_B.bias") for k in v["factors"]) for v in keys.values())

    result = ddiscan.prune(tmp_path / "base", tmp_path / "adapter", tmp_path / "pruned", top=2, mode=mode)
    pruned = set(result.selection.names)
    assert len(pruned) == 2
    assert not any("lora_B.bias" in s["key"] for s in result.report.to_dict()["skipped"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "pruned")
    assert not [w for w in caught if "unexpected" in str(w.message).lower() or "missing" in str(w.message).lower()]
    merged = reloaded.merge_and_unload().state_dict()
    full = PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "adapter").merge_and_unload().state_dict()
    base = tiny_llama(attention_bias=True).state_dict()
    for name in keys:
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            if name in pruned:
                assert torch.equal(merged[key], base[key]), key
                assert not torch.allclose(full[key], base[key]), key
            else:
                assert torch.equal(merged[key], full[key]), key
