"""AdaLoRA with ranks removed by PEFT's own budget (issue 16, item 2).

A tiny LLaMA is trained with ``AdaLoraConfig`` and ``update_and_allocate`` after every
step, as PEFT's AdaLoRA documentation prescribes, so that its RankAllocator masks ranks
(rows of lora_E set to 0) and, at the final budget step, writes the ``rank_pattern`` with
which ``save_pretrained`` keeps only the surviving ranks — zero for some modules. ddiscan's
ΔW must equal ``get_delta_weight`` of PEFT's own reload of that file, for every module.
"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import AdaLoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.adalora import AdaLoraLayer  # noqa: E402
from test_real_peft import SCORE_FIELDS, reference_scores, tiny_llama  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.io import TensorIndex  # noqa: E402
from ddiscan.lora import dense_delta, load_adapter, match_modules  # noqa: E402

INIT_R, STEPS = 6, 8


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    root = tmp_path_factory.mktemp("adalora")
    tiny_llama().save_pretrained(root / "base")
    config = AdaLoraConfig(init_r=INIT_R, target_r=1, tinit=1, tfinal=2, deltaT=1, total_step=STEPS, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for step in range(STEPS):
        tokens = torch.randint(0, 100, (4, 16), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    assert model.peft_config["default"].rank_pattern, "PEFT's budget wrote no rank_pattern"
    model.save_pretrained(root / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(), root / "adapter").eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in reloaded.named_modules()
              if isinstance(m, AdaLoraLayer) and "default" in m.lora_E}
    return root, layers


def test_the_budget_pruned_ranks_and_some_modules_to_zero(budgeted):
    _, layers = budgeted
    ranks = {name: layer.lora_E["default"].shape[0] for name, layer in layers.items()}
    assert min(ranks.values()) == 0 and 0 < max(ranks.values()) < INIT_R, ranks


def test_delta_equals_peft_get_delta_weight_of_its_reload(budgeted):
    root, layers = budgeted
    adapter = load_adapter(root / "adapter")
    modules, skipped, _ = match_modules(adapter, TensorIndex(root / "base"))
    kept = {name for name, layer in layers.items() if layer.lora_E["default"].shape[0] > 0}
    assert {m.name for m in modules} == kept
    assert {s.key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for s in skipped
            if "every rank pruned" in s.reason} == set(layers) - kept
    for m in modules:
        peft = layers[m.name].get_delta_weight("default").detach().double().numpy()
        assert np.abs(peft).max() > 0
        np.testing.assert_allclose(dense_delta(m, adapter.file), peft, rtol=1e-6, atol=1e-9)
    for name in set(layers) - kept:
        assert float(layers[name].get_delta_weight("default").abs().max()) == 0.0


def test_exact_scores_equal_the_reference_to_1e_6(budgeted):
    root, layers = budgeted
    report = ddiscan.scan(root / "base", root / "adapter", exact=True)
    index = TensorIndex(root / "base")
    for m in report.modules:
        delta = layers[m.name].get_delta_weight("default").detach().double().numpy()
        w0 = np.asarray(index.array(m.name + ".weight"), dtype=np.float64)
        want = reference_scores(delta, w0, t=m.r)
        for field in SCORE_FIELDS + ("delta_norm", "base_norm"):
            assert math.isclose(getattr(m, field), want[field], rel_tol=1e-6, abs_tol=1e-12), (m.name, field)
