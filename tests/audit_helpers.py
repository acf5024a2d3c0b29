"""Shared by the audit's tests: a collection of real PEFT adapters (written by PEFT over a
tiny LLaMA saved by transformers) with broken adapters among them, and the database's
content in a form that two runs can be compared by."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from safetensors_builders import llama_peft_tensors, peft_config, write_peft_dir

# (name, rank, targets): q/k/v/o and all-linear, several ranks
ADAPTERS = (("qkvo-r4", 4, ["q_proj", "k_proj", "v_proj", "o_proj"]), ("all-r8", 8, "all-linear"),
            ("qv-r2", 2, ["q_proj", "v_proj"]), ("all-r16", 16, "all-linear"))


def build_collection(root: Path) -> dict:
    """``root/base`` (transformers), ``root/adapters/<name>`` (PEFT), and broken ones:
    ``truncated`` (cut weights), ``no-base`` (names a base that is nowhere), ``mismatch``
    (shapes of another model), and ``not-an-adapter.safetensors`` (a base file: passed over)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    adapters = root / "adapters"
    for i, (name, rank, targets) in enumerate(ADAPTERS):
        torch.manual_seed(10 + i)
        model = LlamaForCausalLM.from_pretrained(base)
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(adapters / name)
    good = adapters / ADAPTERS[0][0]
    truncated = shutil.copytree(good, adapters / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    no_base = shutil.copytree(good, adapters / "no-base")
    cfg = json.loads((no_base / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(root / "gone")}))
    write_peft_dir(adapters / "mismatch", llama_peft_tensors(1, 4),
                   peft_config(4, 8, base_model_name_or_path=str(base)))
    shutil.copy(base / "model.safetensors", adapters / "not-an-adapter.safetensors")
    return {"root": root, "base": base, "adapters": adapters, "ok": [adapters / n for n, _, _ in ADAPTERS],
            "errors": [truncated, no_base, adapters / "mismatch"]}


def content(db: Path) -> dict:
    """Everything in the database but row ids, times and the profile directory's place."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        adapters = con.execute("SELECT key, path, sha256, size, base, status, error, n_modules, max_ddi, "
                               "parameters, ddiscan_version FROM adapters ORDER BY key").fetchall()
        modules = con.execute("SELECT a.key, m.* FROM modules m JOIN adapters a ON a.id = m.adapter_id "
                              "ORDER BY a.key, m.module").fetchall()
        modules = [(row[0], *row[2:]) for row in modules]  # without adapter_id
        bases = con.execute("SELECT fingerprint, path, profile FROM bases ORDER BY fingerprint").fetchall()
        files = con.execute("SELECT * FROM files ORDER BY path").fetchall()
    finally:
        con.close()
    bases = [(f, p, Path(profile).name if profile else None) for f, p, profile in bases]
    return {"adapters": adapters, "modules": modules, "bases": bases, "files": files}
