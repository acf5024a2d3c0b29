"""A corpus of hostile and broken inputs for ddiscan, each with the exit code it must get.

Every input is generated (no hand-edited bytes): valid files come from the safetensors
library, malformed ones from ``safetensors_builders.raw_safetensors`` or from cutting a
valid file. Each case is a directory holding its files and a :class:`Case` naming the
BASE and ADAPTER to pass, the documented exit code (0 ok, 3 bad input), and whether a
``warning:`` line is expected (valid but odd inputs such as NaN weights).

Used by ``tests/test_hostile.py``; from the shell::

    python tests/make_bad_inputs.py OUTDIR      # writes OUTDIR/<case>/... and OUTDIR/manifest.json

Cases whose ``unreadable`` list is not empty stand for files the user may not read. The
tests run as root, which reads anything whatever its mode, so those files are written
readable and the tests make every ``open`` of them raise ``PermissionError``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from safetensors_builders import (  # noqa: E402
    HIDDEN,
    contiguous_header,
    entry,
    llama_base_tensors,
    llama_peft_tensors,
    peft_tensors_without,
    lora_pair,
    peft_config,
    raw_safetensors,
    save,
    write_index,
    write_peft_dir,
)

__all__ = ["Case", "CASES", "build_case", "build_corpus", "PickleBomb", "MARKER_NAME", "main"]

OK, BAD_INPUT = 0, 3
MARKER_NAME = "UNPICKLED-MARKER"
STEM = "base_model.model.model.layers.0.self_attn"


@dataclass
class Case:
    """One input pair and what ddiscan must answer.

    ``base``/``adapter`` are the paths to pass (possibly missing, directories, links);
    ``code`` the exit code; ``warning`` whether exit 0 comes with a ``warning:`` line;
    ``unreadable`` paths whose every open must fail with EACCES; ``marker`` a file whose
    appearance proves a pickle was loaded.
    """

    name: str
    base: Path
    adapter: Path
    code: int
    warning: bool = False
    unreadable: list[Path] = field(default_factory=list)
    marker: Path | None = None

    def to_dict(self, root: Path) -> dict:
        rel = lambda p: os.path.relpath(p, root)  # noqa: E731
        return {"name": self.name, "base": rel(self.base), "adapter": rel(self.adapter), "code": self.code,
                "warning": self.warning, "unreadable": [rel(p) for p in self.unreadable],
                "marker": rel(self.marker) if self.marker else None}


class PickleBomb:
    """Pickles to a payload whose unpickling creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bomb(path: Path, marker: Path, protocol: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": PickleBomb(marker)}, protocol=protocol))
    return path


# ---------------------------------------------------------------------------------------
# Building blocks: a good base and adapter, and ways to break one of them


def _good_base(d: Path) -> Path:
    return save(d / "base" / "model.safetensors", llama_base_tensors(1))


def _good_adapter(d: Path, tensors=None, config=None) -> Path:
    return write_peft_dir(d / "adapter", tensors if tensors is not None else llama_peft_tensors(1, 4),
                          config if config is not None else peft_config(4, 8))


def _adapter_file(d: Path, tensors=None) -> Path:
    """A bare adapter file (no config): for prune it is a file-to-file rewrite."""
    return save(d / "adapter.safetensors", tensors if tensors is not None else llama_peft_tensors(1, 4))


def _cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def _header_len(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _bad_base(build, code=BAD_INPUT, warning=False):
    """A case whose base file is written by ``build(path)`` and whose adapter is good."""
    def case(d: Path, name: str) -> Case:
        path = d / "base" / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        build(path)
        return Case(name, path, _good_adapter(d), code, warning)
    return case


def _bad_adapter(build, code=BAD_INPUT, warning=False):
    """A case whose adapter file is written by ``build(path)`` (a PEFT dir, good config)."""
    def case(d: Path, name: str) -> Case:
        adapter = d / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text(json.dumps(peft_config(4, 8)))
        build(adapter / "adapter_model.safetensors")
        return Case(name, _good_base(d), adapter, code, warning)
    return case


def _adapter_tensors(tensors_fn, config=None, code=BAD_INPUT, warning=False, base_fn=None):
    def case(d: Path, name: str) -> Case:
        base = save(d / "base" / "model.safetensors", base_fn() if base_fn else llama_base_tensors(1))
        return Case(name, base, _good_adapter(d, tensors_fn(), config), code, warning)
    return case


def _mlx_adapter(tensors_fn, code=BAD_INPUT):
    """An MLX-LM adapter directory (adapters.safetensors + the adapter_config.json of
    ``mlx_lm lora``) holding ``tensors_fn()``."""
    def case(d: Path, name: str) -> Case:
        adapter = d / "adapter"
        save(adapter / "adapters.safetensors", tensors_fn())
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}))
        return Case(name, _good_base(d), adapter, code)
    return case


def _config(text: str | bytes, code=BAD_INPUT, warning=False):
    def case(d: Path, name: str) -> Case:
        adapter = _good_adapter(d)
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        (adapter / "adapter_config.json").write_bytes(raw)
        return Case(name, _good_base(d), adapter, code, warning)
    return case


def _two(dtype="F32", a=(0, 4), b=(4, 8), size=8, shape_b=(1,)):
    return lambda p: raw_safetensors(p, {"a": entry(dtype, [1], *a), "b": entry("F32", list(shape_b), *b)}, size)


def _replace_in_header(tensors, pattern: str, repl: str, count: int = 1):
    """A valid file from ``tensors`` with one regex substitution in its header text
    (same length kept by space padding, so offsets still point where they did)."""
    def build(path: Path):
        save(path, tensors())
        data = path.read_bytes()
        n = _header_len(path)
        text = data[8:8 + n].decode()
        new, k = re.subn(pattern, repl, text, count=count)
        assert k, (pattern, text[:200])
        raw_safetensors(path, new.encode(), data[8 + n:], pad=True)
    return build


def _with(key, value, base=True):
    def tensors():
        t = llama_base_tensors(1) if base else llama_peft_tensors(1, 4)
        t[key] = value
        return t
    return tensors


def _poisoned(key, value, at=(0, 0), base=False):
    def tensors():
        t = llama_base_tensors(1) if base else llama_peft_tensors(1, 4)
        t[key] = t[key].copy()
        t[key][at] = value
        return t
    return tensors


# ---------------------------------------------------------------------------------------
# Paths


def _missing_base(d, name):
    return Case(name, d / "no-such-base.safetensors", _good_adapter(d), BAD_INPUT)


def _missing_adapter(d, name):
    return Case(name, _good_base(d), d / "no-such-adapter", BAD_INPUT)


def _empty_dir_base(d, name):
    (d / "empty").mkdir(parents=True)
    return Case(name, d / "empty", _good_adapter(d), BAD_INPUT)


def _dir_named_like_a_file(d, name):
    (d / "model.safetensors").mkdir(parents=True)
    return Case(name, d / "model.safetensors", _good_adapter(d), BAD_INPUT)


def _adapter_model_is_a_dir(d, name):
    adapter = d / "adapter"
    (adapter / "adapter_model.safetensors").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(peft_config(4, 8)))
    return Case(name, _good_base(d), adapter, BAD_INPUT)


def _adapter_dir_without_model(d, name):
    adapter = d / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(peft_config(4, 8)))
    return Case(name, _good_base(d), adapter, BAD_INPUT)


def _dangling(which):
    def case(d, name):
        base, adapter = _good_base(d), _adapter_file(d)
        link = d / f"dangling-{which}.safetensors"
        link.symlink_to(d / "gone.safetensors")
        return Case(name, link if which == "base" else base, link if which == "adapter" else adapter, BAD_INPUT)
    return case


def _symlink_loop(d, name):
    a, b = d / "loop-a.safetensors", d / "loop-b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    return Case(name, a, _good_adapter(d), BAD_INPUT)


def _symlinks_to_valid(d, name):
    base, adapter = _good_base(d), _adapter_file(d)
    (d / "links").mkdir()
    (d / "links" / "base.safetensors").symlink_to(base)
    (d / "links" / "adapter.safetensors").symlink_to(adapter)
    return Case(name, d / "links" / "base.safetensors", d / "links" / "adapter.safetensors", OK, warning=True)


def _symlinked_adapter_dir(d, name):
    adapter = _good_adapter(d)
    (d / "link-adapter").symlink_to(adapter, target_is_directory=True)
    return Case(name, _good_base(d), d / "link-adapter", OK)


def _fifo_adapter(d, name):
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "adapter.safetensors")
    return Case(name, _good_base(d), d / "adapter.safetensors", BAD_INPUT)


def _unreadable(which):
    def case(d, name):
        base, adapter = _good_base(d), _good_adapter(d)
        target = {"base": base, "adapter": adapter / "adapter_model.safetensors",
                  "config": adapter / "adapter_config.json"}[which]
        return Case(name, base, adapter, BAD_INPUT, unreadable=[target])
    return case


# ---------------------------------------------------------------------------------------
# Pickles: refused, never loaded


def _pickle(where, suffix=".bin", protocol=4):
    def case(d, name):
        d.mkdir(parents=True, exist_ok=True)
        marker = d / MARKER_NAME
        if where == "base":
            base, adapter = pickle_bomb(d / f"pytorch_model{suffix}", marker, protocol), _good_adapter(d)
        elif where == "base-dir":
            pickle_bomb(d / "ckpt" / "pytorch_model.bin", marker, protocol)
            base, adapter = d / "ckpt", _good_adapter(d)
        elif where == "adapter-dir":
            adapter = d / "adapter"
            pickle_bomb(adapter / "adapter_model.bin", marker, protocol)
            (adapter / "adapter_config.json").write_text(json.dumps(peft_config(4, 8)))
            base = _good_base(d)
        else:  # adapter file
            base, adapter = _good_base(d), pickle_bomb(d / f"adapter_model{suffix}", marker, protocol)
        return Case(name, base, adapter, BAD_INPUT, marker=marker)
    return case


# ---------------------------------------------------------------------------------------
# Header and data


def _truncated_in_header(path):
    save(path, llama_base_tensors(1))
    _cut(path, 8 + _header_len(path) // 2)


def _truncated_in_data(path):
    save(path, llama_base_tensors(1))
    _cut(path, 8 + _header_len(path) + 100)


def _truncated_in_prefix(path):
    save(path, llama_base_tensors(1))
    _cut(path, 5)


def _extended(path):
    save(path, llama_base_tensors(1))
    with open(path, "ab") as f:
        f.write(bytes(16))


def _adapter_truncated_in_data(path):
    save(path, llama_peft_tensors(1, 4))
    _cut(path, path.stat().st_size - 1)


def _zero_length_tensors_in_base():
    t = llama_base_tensors(1)
    t["model.extra.empty"] = np.zeros((0, 7), np.float32)
    t["model.extra.scalar"] = np.array(3.0, np.float32)
    return t


def _zero_d_in_adapter():
    t = llama_peft_tensors(1, 4)
    t[f"{STEM}.q_proj.lora_A.weight"] = np.array(1.0, np.float32)
    return t


def _zero_d_base_weight():
    t = llama_base_tensors(1)
    t["model.layers.0.self_attn.q_proj.weight"] = np.array(1.0, np.float32)
    return t


def _rank_zero():
    t = llama_peft_tensors(1, 4, projs=("k_proj",))
    t[f"{STEM}.q_proj.lora_A.weight"] = np.zeros((0, HIDDEN), np.float32)
    t[f"{STEM}.q_proj.lora_B.weight"] = np.zeros((HIDDEN, 0), np.float32)
    return t


def _f4_adapter(path):
    header, size = contiguous_header([
        (f"{STEM}.q_proj.lora_A.weight", "F4", [4, HIDDEN], 4 * HIDDEN // 2),
        (f"{STEM}.q_proj.lora_B.weight", "F32", [HIDDEN, 4], HIDDEN * 4 * 4),
    ])
    raw_safetensors(path, header, size)


def _index(mutate):
    def case(d, name):
        tensors = llama_base_tensors(1)
        half = {k: v for k, v in tensors.items() if "q_proj" in k or "k_proj" in k}
        index = write_index(d / "sharded", {
            "model-00001-of-00002.safetensors": half,
            "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in half},
        })
        mutate(index)
        return Case(name, index, _good_adapter(d), BAD_INPUT)
    return case


def _edit_index(fn):
    def mutate(index):
        data = json.loads(index.read_text())
        fn(data)
        index.write_text(json.dumps(data))
    return mutate


# quantized bases (issue 17): GGUF files written by the gguf package's own writer; GPTQ and
# MLX checkpoints whose companions do not fit (refused whole before the quantized-base
# framework, by the dequantizer after it: exit 3 either way)
_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def _gguf_base(arch="llama", head_count=2, q_shape=None, cut=None):
    def build(d: Path, name: str) -> Case:
        import gguf

        path = d / "base.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_head_count(head_count)
        writer.add_head_count_kv(1)
        for key, value in llama_base_tensors(1).items():
            parts = key.split(".")
            if len(parts) == 6 and parts[4] in _GGUF_NAMES:
                if parts[4] == "q_proj" and q_shape is not None:
                    value = np.ones(q_shape, np.float32)
                writer.add_tensor(f"blk.0.{_GGUF_NAMES[parts[4]]}.weight", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if cut is not None:
            _cut(path, cut)
        return Case(name, path, _good_adapter(d), BAD_INPUT)
    return build


def _not_gguf(d: Path, name: str) -> Case:
    path = d / "base.gguf"
    path.write_bytes(b"not a GGUF file " * 8)
    return Case(name, path, _good_adapter(d), BAD_INPUT)


def _quantized_checkpoint(tensors_fn, config: dict):
    """A base directory: ``tensors_fn(base_tensors)`` as its weights, ``config`` its config.json."""
    def build(d: Path, name: str) -> Case:
        base = d / "base"
        save(base / "model.safetensors", tensors_fn(llama_base_tensors(1)))
        (base / "config.json").write_text(json.dumps(config))
        return Case(name, base, _good_adapter(d), BAD_INPUT)
    return build


def _gptq_bad_qzeros(tensors):
    """q_proj as GPTQ 4-bit, groups of 8 input columns, qzeros one group short."""
    stem = "model.layers.0.self_attn.q_proj"
    del tensors[stem + ".weight"]
    tensors[stem + ".qweight"] = np.zeros((HIDDEN // 8, HIDDEN), np.int32)
    tensors[stem + ".qzeros"] = np.zeros((1, HIDDEN // 8), np.int32)
    tensors[stem + ".scales"] = np.ones((2, HIDDEN), np.float16)
    return tensors


def _mlx_bad_scales(tensors):
    """q_proj as MLX 4-bit in groups of 32 input columns... of which it has only 16."""
    stem = "model.layers.0.self_attn.q_proj"
    tensors[stem + ".weight"] = np.zeros((HIDDEN, HIDDEN * 4 // 32), np.uint32)
    tensors[stem + ".scales"] = np.ones((HIDDEN, 3), np.float32)
    tensors[stem + ".biases"] = np.zeros((HIDDEN, 3), np.float32)
    return tensors


CASES = {
    # paths
    "missing base": _missing_base,
    "missing adapter": _missing_adapter,
    "empty directory as base": _empty_dir_base,
    "directory named like a safetensors file": _dir_named_like_a_file,
    "adapter_model.safetensors is a directory": _adapter_model_is_a_dir,
    "adapter directory without model": _adapter_dir_without_model,
    "dangling symlink base": _dangling("base"),
    "dangling symlink adapter": _dangling("adapter"),
    "symlink loop": _symlink_loop,
    "symlinks to valid files": _symlinks_to_valid,
    "symlinked adapter directory": _symlinked_adapter_dir,
    "fifo as adapter": _fifo_adapter,
    "unreadable base": _unreadable("base"),
    "unreadable adapter": _unreadable("adapter"),
    "unreadable adapter_config.json": _unreadable("config"),
    # pickles
    "pickled base .bin": _pickle("base"),
    "pickled base .pt protocol 2": _pickle("base", ".pt", 2),
    "pickled base named .safetensors": _pickle("base", ".safetensors", 4),
    "pickle protocol 0 named .safetensors": _pickle("base", ".safetensors", 0),
    "directory holding only a pickle": _pickle("base-dir"),
    "adapter directory holding only a pickle": _pickle("adapter-dir"),
    "pickled adapter .bin": _pickle("adapter"),
    # the length prefix and the header
    "empty file": _bad_base(lambda p: p.write_bytes(b"")),
    "truncated in the length prefix": _bad_base(_truncated_in_prefix),
    "truncated in the header": _bad_base(_truncated_in_header),
    "truncated in the data": _bad_base(_truncated_in_data),
    "adapter truncated in the data": _bad_adapter(_adapter_truncated_in_data),
    "bytes after the data": _bad_base(_extended),
    "header length beyond the file": _bad_base(lambda p: raw_safetensors(p, {}, header_len=1 << 20)),
    "header length over 100 MB": _bad_base(lambda p: raw_safetensors(p, {}, 64, header_len=100_000_001)),
    "header length 2**64-1": _bad_base(lambda p: raw_safetensors(p, {}, header_len=2**64 - 1)),
    "zero header length": _bad_base(lambda p: raw_safetensors(p, b"", header_len=0, pad=False)),
    "invalid json": _bad_base(lambda p: raw_safetensors(p, '{"a": ')),
    "header not utf-8": _bad_base(lambda p: raw_safetensors(p, b'{"\xff\xfe": 1}')),
    "header is a list": _bad_base(lambda p: raw_safetensors(p, "[1, 2]")),
    "header is null": _bad_base(lambda p: raw_safetensors(p, "null")),
    "tensor entry not an object": _bad_base(lambda p: raw_safetensors(p, {"a": [1, 2]})),
    "duplicate keys": _bad_base(lambda p: raw_safetensors(
        p, '{"k": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           '"k": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8)),
    "duplicate keys in the adapter": _bad_adapter(_replace_in_header(
        lambda: llama_peft_tensors(1, 4, projs=("q_proj",)), r"lora_B\.weight", "lora_A.weight")),
    "metadata not strings": _bad_base(lambda p: raw_safetensors(p, {"__metadata__": {"n": 1}})),
    # offsets
    "offsets leave a gap": _bad_base(_two(b=(6, 10), size=10)),
    "offsets overlap": _bad_base(_two(b=(2, 6), size=6)),
    "offsets out of range": _bad_base(_two(b=(4, 12), shape_b=(2,), size=8)),
    "offsets reversed": _bad_base(_two(b=(8, 4), size=8)),
    "offsets negative": _bad_base(_two(a=(-4, 0), b=(0, 4), size=4)),
    "offsets beyond 2**64": _bad_base(_two(b=(4, 2**70), size=8)),
    "offsets not integers": _bad_base(lambda p: raw_safetensors(p, {"a": entry("F32", [1], 0.0, 4.0)}, 4)),
    "offsets not starting at 0": _bad_base(_two(a=(4, 8), b=(8, 12), size=12)),
    # dtypes and shapes
    "dtype size does not match offsets": _bad_base(lambda p: raw_safetensors(p, {"a": entry("F32", [3], 0, 8)}, 8)),
    "F64 relabelled F32 in the base": _bad_base(_replace_in_header(
        lambda: {k: v.astype(np.float64) for k, v in llama_base_tensors(1).items()}, '"F64"', '"F32"')),
    "unknown dtype Q4": _bad_base(lambda p: raw_safetensors(p, {"a": entry("Q4", [8], 0, 4)}, 4)),
    "lowercase dtype f32": _bad_base(lambda p: raw_safetensors(p, {"a": entry("f32", [1], 0, 4)}, 4)),
    "dtype null": _bad_base(lambda p: raw_safetensors(p, {"a": {"dtype": None, "shape": [1], "data_offsets": [0, 4]}}, 4)),
    "adapter dtype F4 (valid, unreadable)": _bad_adapter(_f4_adapter),
    "negative shape": _bad_base(lambda p: raw_safetensors(p, {"a": entry("F32", [-1], 0, 4)}, 4)),
    "shape of floats": _bad_base(lambda p: raw_safetensors(p, {"a": entry("F32", [1.0], 0, 4)}, 4)),
    "absurd shape 2**40 x 2**40": _bad_base(lambda p: raw_safetensors(p, {"a": entry("F32", [2**40, 2**40], 0, 4)}, 4)),
    "absurd shape of 64 dims": _bad_base(lambda p: raw_safetensors(p, {"a": entry("F64", [2**20] * 64, 0, 8)}, 8)),
    "zero-length and 0-d tensors in the base": _adapter_tensors(
        lambda: llama_peft_tensors(1, 4), base_fn=_zero_length_tensors_in_base, code=OK),
    "0-d lora_A": _adapter_tensors(_zero_d_in_adapter),
    "0-d base weight": _adapter_tensors(lambda: llama_peft_tensors(1, 4), base_fn=_zero_d_base_weight),
    "rank-0 LoRA pair": _adapter_tensors(_rank_zero, config=peft_config(0, 8)),
    # values
    "NaN in lora_B": _adapter_tensors(_poisoned(f"{STEM}.v_proj.lora_B.weight", np.nan), code=OK, warning=True),
    "Inf in lora_A": _adapter_tensors(_poisoned(f"{STEM}.q_proj.lora_A.weight", -np.inf), code=OK, warning=True),
    "Inf in the base weight": _adapter_tensors(
        lambda: llama_peft_tensors(1, 4), code=OK, warning=True,
        base_fn=_poisoned("model.layers.0.self_attn.o_proj.weight", np.inf, base=True)),
    "NaN in every module": _adapter_tensors(
        lambda: {k: np.full_like(v, np.nan) for k, v in llama_peft_tensors(1, 4).items()}, code=OK, warning=True),
    # LoRA structure
    "base/adapter shape mismatch": _adapter_tensors(lambda: {
        f"{STEM}.v_proj.lora_A.weight": lora_pair(HIDDEN, HIDDEN, 4)[0],
        f"{STEM}.v_proj.lora_B.weight": lora_pair(HIDDEN, HIDDEN, 4)[1]}),
    "lora_A without lora_B": _adapter_tensors(peft_tensors_without(f"{STEM}.k_proj.lora_B.weight")),
    "lora_B without lora_A": _adapter_tensors(peft_tensors_without(f"{STEM}.o_proj.lora_A.weight")),
    "ranks differ between A and B": _adapter_tensors(lambda: {
        f"{STEM}.q_proj.lora_A.weight": lora_pair(HIDDEN, HIDDEN, 4)[0],
        f"{STEM}.q_proj.lora_B.weight": lora_pair(HIDDEN, HIDDEN, 3)[1]}),
    "MLX-LM lora_a and lora_b ranks differ": _mlx_adapter(lambda: {
        "model.layers.0.self_attn.q_proj.lora_a": lora_pair(HIDDEN, HIDDEN, 4)[0].T.copy(),
        "model.layers.0.self_attn.q_proj.lora_b": lora_pair(HIDDEN, HIDDEN, 3)[1].T.copy()}),
    "VeRA adapter missing vera_A": _adapter_tensors(lambda: {
        f"{STEM}.q_proj.vera_lambda_b": np.ones(HIDDEN, np.float32),
        f"{STEM}.q_proj.vera_lambda_d": np.ones(4, np.float32),
        "base_model.vera_B": lora_pair(HIDDEN, HIDDEN, 4)[1]},
        config={"peft_type": "VERA", "r": 4, "save_projection": True, "target_modules": ["q_proj"]}),
    "no LoRA pairs": _adapter_tensors(lambda: {"base_model.model.lm_head.weight": np.ones((4, 4), np.float32)}),
    "unmatched module": _adapter_tensors(lambda: {
        **llama_peft_tensors(1, 4, projs=("q_proj",)),
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": lora_pair(32, HIDDEN, 4)[0],
        "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": lora_pair(32, HIDDEN, 4)[1]}),
    "quantized base (U8)": _adapter_tensors(
        lambda: llama_peft_tensors(1, 4, projs=("q_proj",)),
        base_fn=_with("model.layers.0.self_attn.q_proj.weight", np.zeros((HIDDEN, HIDDEN), np.uint8))),
    # adapter_config.json
    "config not JSON": _config("{r: 4, lora_alpha: }"),
    "config not UTF-8": _config(b'{"r": 4, "lora_alpha": 8, "x": "\xff"}'),
    "config is a list": _config("[4, 8]"),
    "config r contradicts tensors": _config(json.dumps(peft_config(16, 32))),
    "config alpha not a number": _config(json.dumps(peft_config(4, "eight"))),
    "config without r": _config(json.dumps({"peft_type": "LORA", "lora_alpha": 8})),
    "config alpha NaN": _config(json.dumps(peft_config(4, float("nan"))), code=OK, warning=True),
    # sharded checkpoints
    "index not JSON": _index(lambda index: index.write_text("{weight_map: }")),
    "index shard missing": _index(lambda index: (index.parent / "model-00002-of-00002.safetensors").unlink()),
    "index shard outside the directory": _index(_edit_index(
        lambda data: data["weight_map"].__setitem__("lm_head.weight", "../elsewhere.safetensors"))),
    "index names the wrong shard": _index(_edit_index(
        lambda data: data["weight_map"].__setitem__("model.layers.0.self_attn.v_proj.weight",
                                                    "model-00001-of-00002.safetensors"))),
    "index weight_map not a dict": _index(_edit_index(lambda data: data.__setitem__("weight_map", [1]))),
    # quantized bases
    "GGUF base of an unknown architecture": _gguf_base(arch="mamba"),
    "GGUF base that is not GGUF": _not_gguf,
    "GGUF base truncated": _gguf_base(cut=200),
    "GGUF head count that does not fit attn_q": _gguf_base(head_count=3),
    "GGUF dims not matching the adapter": _gguf_base(q_shape=(HIDDEN // 2, HIDDEN)),
    "GPTQ base with qzeros of the wrong shape": _quantized_checkpoint(_gptq_bad_qzeros, {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": False}}),
    "MLX base with scales not matching groups": _quantized_checkpoint(_mlx_bad_scales, {
        "quantization": {"group_size": 32, "bits": 4}, "quantization_config": {"group_size": 32, "bits": 4}}),
}


# quantized bases: the weight stored by the real quantizer, its config by transformers, one
# companion then broken (imported only when the case is built: torch is slow to import)
QPROJ = "model.layers.0.self_attn.q_proj"


def _bnb_4bit_tensors() -> dict:
    import bitsandbytes.functional as bnb_functional
    import torch

    weight = torch.from_numpy(llama_base_tensors(1)[f"{QPROJ}.weight"])
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    stored = {f"{QPROJ}.weight": packed, **{f"{QPROJ}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    return {k: v.numpy() for k, v in stored.items()}


def _quant_state(**change) -> np.ndarray:
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [HIDDEN, HIDDEN], **change}
    return np.frombuffer(json.dumps(state).encode(), np.uint8).copy()


def _quantized_base(edit, quantization_config, tensors=_bnb_4bit_tensors):
    """A case whose base is a checkpoint quantized as ``quantization_config()`` says, with
    q_proj's stored tensors (``tensors()``) changed by ``edit``."""
    def case(d: Path, name: str) -> Case:
        import transformers

        stored = tensors()
        edit(stored)
        base = {k: v for k, v in llama_base_tensors(1).items() if k != f"{QPROJ}.weight"}
        path = save(d / "base" / "model.safetensors", {**base, **stored})
        transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=1,
                                 quantization_config=quantization_config()).save_pretrained(path.parent)
        return Case(name, path.parent, _good_adapter(d), BAD_INPUT)
    return case


def _nf4_config() -> dict:
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()


def _fp8_tensors() -> dict:
    import ml_dtypes

    weight = llama_base_tensors(1)[f"{QPROJ}.weight"]
    return {f"{QPROJ}.weight": weight.astype(ml_dtypes.float8_e4m3fn),
            f"{QPROJ}.weight_scale_inv": np.ones((2, 2), np.float32)}


def _fp8_config() -> dict:
    import transformers

    return transformers.FineGrainedFP8Config(weight_block_size=(8, 8)).to_dict()


def _int8_tensors() -> dict:
    weight = llama_base_tensors(1)[f"{QPROJ}.weight"]
    scb = np.abs(weight).max(axis=1).astype(np.float32)
    return {f"{QPROJ}.weight": np.round(weight / scb[:, None] * 127).astype(np.int8), f"{QPROJ}.SCB": scb}


def _int8_config() -> dict:
    import transformers

    return transformers.BitsAndBytesConfig(load_in_8bit=True).to_dict()


QUANTIZED_CASES = {
    "bnb-4bit absmax of the wrong length": _quantized_base(
        lambda t: t.update({f"{QPROJ}.weight.absmax": t[f"{QPROJ}.weight.absmax"][:-1]}), _nf4_config),
    "bnb-4bit quant_state naming another shape": _quantized_base(
        lambda t: t.update({f"{QPROJ}.weight.quant_state.bitsandbytes__nf4": _quant_state(shape=[HIDDEN, 2 * HIDDEN])}),
        _nf4_config),
    "bnb-4bit quant_state of an unknown quant_type": _quantized_base(
        lambda t: t.update({f"{QPROJ}.weight.quant_state.bitsandbytes__nf4": _quant_state(quant_type="af4")}),
        _nf4_config),
    "bnb-4bit quant_state not JSON": _quantized_base(
        lambda t: t.update({f"{QPROJ}.weight.quant_state.bitsandbytes__nf4": np.zeros(3, np.uint8)}), _nf4_config),
    "bnb-4bit without absmax": _quantized_base(lambda t: t.pop(f"{QPROJ}.weight.absmax"), _nf4_config),
    "bnb-4bit quant_map not nf4": _quantized_base(
        lambda t: t.update({f"{QPROJ}.weight.quant_map": np.linspace(-1, 1, 16).astype(np.float32)}), _nf4_config),
    "bnb-8bit SCB of the wrong length": _quantized_base(
        lambda t: t.update({f"{QPROJ}.SCB": t[f"{QPROJ}.SCB"][:3]}), _int8_config, _int8_tensors),
    "fp8 block scales not matching the blocks": _quantized_base(
        lambda t: t.update({f"{QPROJ}.weight_scale_inv": np.ones((3, 2), np.float32)}), _fp8_config, _fp8_tensors),
    "fp8 weight_block_size not a pair": _quantized_base(
        lambda t: None, lambda: {**_fp8_config(), "weight_block_size": [8]}, _fp8_tensors),
    "quantization_config of a scheme ddiscan does not decode": _quantized_base(
        lambda t: None, lambda: {"quant_method": "eetq", "weights": "int8"}, _int8_tensors),
}

CASES.update(QUANTIZED_CASES)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_case(name: str, root) -> Case:
    """Write case ``name`` into ``root/<slug>/`` and return it."""
    d = Path(root) / _slug(name)
    d.mkdir(parents=True, exist_ok=False)
    return CASES[name](d, name)


def build_corpus(root) -> list[Case]:
    """Write every case under ``root``; return them in a stable order."""
    return [build_case(name, root) for name in sorted(CASES)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/make_bad_inputs.py OUTDIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    root.mkdir(parents=True, exist_ok=True)
    cases = build_corpus(root)
    (root / "manifest.json").write_text(json.dumps([c.to_dict(root) for c in cases], indent=2) + "\n")
    print(f"wrote {len(cases)} cases to {root} (manifest.json gives each one's expected exit code)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
