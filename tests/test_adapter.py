"""ddiscan.adapter: reading an adapter and its adapter_config.json."""

from __future__ import annotations

import pytest

from ddiscan.errors import InputError

from matching_helpers import match
from safetensors_builders import peft_config, write_llama_pair


def test_adapter_given_as_file_uses_sibling_config(tmp_path):
    base, adapter = write_llama_pair(tmp_path, config=peft_config(4, 16))
    modules, _, _ = match(base, adapter / "adapter_model.safetensors")
    assert {m.scale for m in modules} == {4.0}


def test_config_not_json(tmp_path):
    base, adapter = write_llama_pair(tmp_path, r=4)
    (adapter / "adapter_config.json").write_text("{oops")
    with pytest.raises(InputError) as info:
        match(base, adapter)
    assert "adapter_config.json" in str(info.value)
