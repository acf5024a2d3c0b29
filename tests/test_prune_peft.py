"""PEFT itself loads what ddiscan prune writes (zero and drop modes), and the result is exact."""

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ddiscan.cli import cli  # noqa: E402


def _config():
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    base.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 64, (4, 12))
    for _ in range(5):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "adapter")
    return root


def _load(root, adapter_dir):
    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(root / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    messages = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return model, messages


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_pruned_adapter_loads_in_peft_and_merges_exactly(trained, tmp_path, mode):
    out = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(trained / "base"), str(trained / "adapter"), "--top", "3",
                                      "--mode", mode, "-o", str(out), "--report-out", str(tmp_path / "r.json")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import json
    pruned = json.loads((tmp_path / "r.json").read_text())["selection"]["pruned"]
    assert len(pruned) == 3

    model, complaints = _load(trained, out)
    assert complaints == []
    merged = model.merge_and_unload().state_dict()
    full = _load(trained, trained / "adapter")[0].merge_and_unload().state_dict()
    base = LlamaForCausalLM.from_pretrained(trained / "base").state_dict()
    lora_modules = {n for n in pruned}
    checked = 0
    for key, weight in merged.items():
        module = key.removesuffix(".weight")
        if module in lora_modules:
            assert torch.equal(weight, base[key]), key
            assert not torch.equal(full[key], base[key]), key
            checked += 1
        else:
            assert torch.equal(weight, full[key]), key
    assert checked == 3

    # a model built by hand from those weights gives the same forward pass
    by_hand = LlamaForCausalLM(_config())
    state = {k: (base[k] if k.removesuffix(".weight") in lora_modules else full[k]) for k in full}
    by_hand.load_state_dict(state)
    tokens = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens).logits, by_hand(input_ids=tokens).logits, atol=1e-6)
