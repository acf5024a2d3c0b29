"""Build safetensors files for the tests: valid ones with the safetensors library, malformed
ones byte by byte from a description (never hand-edited bytes).

Valid files come from ``safetensors.numpy.save_file``; the malformed ones are produced by
``raw_safetensors``, which writes the 8-byte little-endian header length, the header text
and a data region exactly as told, so each test can break one rule of the format at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

__all__ = [
    "save",
    "raw_safetensors",
    "entry",
    "contiguous_header",
    "safetensors_accepts",
    "lora_pair",
    "write_peft_dir",
    "write_index",
    "rng",
]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def save(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name → numpy array) with the safetensors library itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(
        {k: np.require(v, requirements="C") for k, v in tensors.items()}, str(path), metadata=metadata
    )
    return path


def entry(dtype: str, shape, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def contiguous_header(specs, metadata: dict | None = None) -> tuple[dict, int]:
    """A well-formed header for ``specs`` = [(name, dtype, shape, nbytes)], and its data size."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in specs:
        header[name] = entry(dtype, shape, offset, offset + nbytes)
        offset += nbytes
    return header, offset


def raw_safetensors(
    path,
    header,
    data: bytes | int = b"",
    *,
    header_len: int | None = None,
    pad: bool = True,
) -> Path:
    """Write a safetensors-like file byte by byte.

    ``header`` is a dict (serialised as compact JSON), a str or raw bytes (written as is).
    ``data`` is the data region, or a byte count (filled with zeros). ``header_len``
    overrides the 8-byte length prefix (for lying about the header's size). The header is
    space-padded to a multiple of 8 bytes like the library does, unless ``pad`` is False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    elif isinstance(header, str):
        raw = header.encode("utf-8")
    else:
        raw = bytes(header)
    if pad and len(raw) % 8:
        raw += b" " * (8 - len(raw) % 8)
    if isinstance(data, int):
        data = bytes(data)
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def safetensors_accepts(path) -> bool:
    """Whether the real safetensors library opens the file and reads every tensor."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # the library raises SafetensorError, ValueError, OSError, ...
        return False
    return True


def lora_pair(d: int, k: int, r: int, *, seed: int = 0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A r×k, lora_B d×r) with nonzero entries."""
    g = rng(seed)
    return (g.standard_normal((r, k)).astype(dtype), g.standard_normal((d, r)).astype(dtype))


def write_peft_dir(directory, tensors: dict, config: dict | None) -> Path:
    """A PEFT adapter directory: adapter_model.safetensors (+ adapter_config.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save(directory / "adapter_model.safetensors", tensors)
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def write_index(directory, shards: dict[str, dict]) -> Path:
    """A sharded checkpoint: each shard file name → its tensors, plus the index json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, tensors in shards.items():
        save(directory / shard, tensors)
        weight_map.update({name: shard for name in tensors})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return index


# ---------------------------------------------------------------------------------------
# Small model layouts

HIDDEN, KV_DIM, VOCAB = 16, 8, 32
LLAMA_PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_DIM, HIDDEN), "v_proj": (KV_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}


def llama_base_tensors(layers: int = 2, *, seed: int = 1, dtype=np.float32) -> dict:
    """A LLaMA-style base with grouped-query attention (k/v are KV_DIM × HIDDEN)."""
    g = rng(seed)
    tensors = {"model.embed_tokens.weight": g.standard_normal((VOCAB, HIDDEN)).astype(dtype)}
    for i in range(layers):
        for proj, shape in LLAMA_PROJ.items():
            tensors[f"model.layers.{i}.self_attn.{proj}.weight"] = g.standard_normal(shape).astype(dtype)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = g.standard_normal((2 * HIDDEN, HIDDEN)).astype(dtype)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(HIDDEN, dtype)
    tensors["model.norm.weight"] = np.ones(HIDDEN, dtype)
    tensors["lm_head.weight"] = g.standard_normal((VOCAB, HIDDEN)).astype(dtype)
    return tensors


def llama_peft_tensors(layers: int = 2, r: int = 4, *, projs=tuple(LLAMA_PROJ), adapter_name: str | None = None,
                       seed: int = 2, ranks: dict | None = None) -> dict:
    """PEFT keys ``base_model.model.model.layers.N.self_attn.P.lora_{A,B}[.name].weight``."""
    g = rng(seed)
    mid = f".{adapter_name}" if adapter_name else ""
    tensors = {}
    for i in range(layers):
        for proj in projs:
            d, k = LLAMA_PROJ[proj]
            name = f"model.layers.{i}.self_attn.{proj}"
            rank = (ranks or {}).get(name, r)
            tensors[f"base_model.model.{name}.lora_A{mid}.weight"] = g.standard_normal((rank, k)).astype(np.float32)
            tensors[f"base_model.model.{name}.lora_B{mid}.weight"] = g.standard_normal((d, rank)).astype(np.float32)
    return tensors



def peft_tensors_without(key: str, layers: int = 1, r: int = 4):
    """A function giving llama_peft_tensors(layers, r) with ``key`` removed (an unpaired factor)."""
    def tensors():
        t = llama_peft_tensors(layers, r)
        del t[key]
        return t
    return tensors

def peft_config(r: int = 4, lora_alpha: float = 8, **extra) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, **extra}


def write_llama_pair(tmp, *, layers: int = 2, r: int = 4, config: dict | None = None, adapter_tensors: dict | None = None,
                     base_tensors: dict | None = None) -> tuple[Path, Path]:
    """(base file, adapter dir) for a tiny LLaMA and a PEFT adapter on q/k/v/o."""
    tmp = Path(tmp)
    base = save(tmp / "base" / "model.safetensors", base_tensors if base_tensors is not None else llama_base_tensors(layers))
    tensors = adapter_tensors if adapter_tensors is not None else llama_peft_tensors(layers, r)
    adapter = write_peft_dir(tmp / "adapter", tensors, config if config is not None else peft_config(r, 2 * r))
    return base, adapter
