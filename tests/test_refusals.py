"""The PEFT methods that are not a low-rank update of W0 are refused in one line that
names the method and says why DDI does not apply (issue 16, item 5; SPEC.md §10).

Every adapter here is written by PEFT itself (``get_peft_model`` + ``save_pretrained``).
"""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from peft import (BOFTConfig, IA3Config, OFTConfig, PrefixTuningConfig, PromptEncoderConfig,  # noqa: E402
                  PromptTuningConfig, get_peft_model)
from test_real_peft import tiny_llama  # noqa: E402

import ddiscan  # noqa: E402
from ddiscan.cli import cli  # noqa: E402
from ddiscan.errors import NoLoraPairs  # noqa: E402

# peft_type → its config, and a word of the reason the refusal must give
REFUSED = {
    "IA3": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "scales W0"),
    "OFT": (OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]), "rotates W0"),
    "BOFT": (BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]), "rotates W0"),
    "PROMPT_TUNING": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prompt"),
    "PREFIX_TUNING": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix"),
    "P_TUNING": (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
                 "prompt"),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    tiny_llama().save_pretrained(root / "base")
    for peft_type, (config, _) in REFUSED.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(tiny_llama(), config).save_pretrained(root / peft_type)
    return root


@pytest.mark.parametrize("peft_type", sorted(REFUSED))
def test_refused_in_one_line_naming_the_type_and_why(adapters, peft_type):
    directory = adapters / peft_type
    result = CliRunner().invoke(cli, ["report", str(adapters / "base"), str(directory)])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert f"peft_type {peft_type} is not supported" in line and REFUSED[peft_type][1] in line, line
    assert "DDI scores low-rank weight updates" in line
    with pytest.raises(NoLoraPairs):
        ddiscan.scan(adapters / "base", directory)


@pytest.mark.parametrize("peft_type", ["IA3", "OFT", "BOFT"])
def test_the_tensors_alone_say_why_too(adapters, peft_type, tmp_path):
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((adapters / peft_type / "adapter_model.safetensors").read_bytes())
    result = CliRunner().invoke(cli, ["report", str(adapters / "base"), str(bare)])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert f"{peft_type} tensor (not LoRA; not supported: " in line and REFUSED[peft_type][1] in line, line
