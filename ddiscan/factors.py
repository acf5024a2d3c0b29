"""The shapes of one LoRA pair's factors, and the checks on them before anything is read.

``factor_shapes`` gives ΔW's scored shape ``(d, k, r, layout)`` (SPEC.md §1: up is d × r,
down r × k; an embedding's factors are transposed, a convolution's flattened);
``base_fit`` says whether a base tensor is W0 as stored or W0ᵀ (GPT-2 ``Conv1D``).
"""

from __future__ import annotations

import math

from .errors import ShapeMismatch, UnsupportedDtype
from .grammars import Pair, mlx_transposed
from .io.reader import FLOAT_DTYPES, SafetensorsFile
from .vera import vera_shapes
from .loha_lokr import structured_shapes

__all__ = ["factor_shapes", "check_float_factors", "check_singular", "check_magnitude", "nonempty", "base_fit"]


def factor_shapes(pair: Pair, file: SafetensorsFile) -> tuple[int, int, int, str]:
    """(d, k, r, layout) of ΔW from the factor shapes, or ShapeMismatch."""
    if pair.family is not None:
        return structured_shapes(pair, file)
    up = file.tensors[pair.up].shape
    down = file.tensors[pair.down].shape
    where = f"{file.path}: {pair.up} {list(up)} / {pair.down} {list(down)}"
    if pair.style == "mlx":
        return _mlx_shapes(pair, up, down, where)
    if pair.style == "vera":
        return vera_shapes(pair.up, pair.down, file)
    if pair.embedding:
        # lora_embedding_A is r × num_embeddings, lora_embedding_B is dim × r; ΔW = (B·A)ᵀ
        if len(up) != 2 or len(down) != 2 or up[1] != down[0]:
            raise ShapeMismatch(f"{where}: embedding factors do not chain")
        return down[1], up[0], down[0], "embedding"
    if len(up) == 2 and len(down) == 2:
        if up[1] != down[0]:
            raise ShapeMismatch(f"{where}: lora_B is d × r and lora_A is r × k, but the ranks differ")
        return up[0], down[1], down[0], "linear"
    if len(up) >= 3 and len(down) == len(up):
        if math.prod(up[2:]) != 1 or up[1] != down[0]:
            raise ShapeMismatch(f"{where}: unsupported convolution LoRA layout")
        return up[0], math.prod(down[1:]), down[0], "conv"
    raise ShapeMismatch(f"{where}: LoRA factors must both be 2-D (or both 4-D convolution kernels)")


def _mlx_shapes(pair: Pair, up, down, where: str) -> tuple[int, int, int, str]:
    """mlx-lm's factors (mlx_lm/tuner/lora.py): a Linear's lora_a is in × r and lora_b r × out,
    ΔW = s·(lora_a·lora_b)ᵀ; an embedding's lora_a is num_embeddings × r and lora_b r × dims,
    ΔW = s·lora_a·lora_b, already in the stored (num_embeddings, dims) orientation."""
    if len(up) != 2 or len(down) != 2:
        raise ShapeMismatch(f"{where}: MLX-LM LoRA factors must both be 2-D (per-expert SwitchLinear LoRA is not read)")
    if mlx_transposed(pair):
        up, down = up[::-1], down[::-1]
    if up[1] != down[0]:
        raise ShapeMismatch(f"{where}: MLX-LM's lora_a is in × r and lora_b is r × out, but the ranks differ")
    return up[0], down[1], down[0], "linear"


def check_float_factors(pair: Pair, file: SafetensorsFile) -> None:
    """LoRA factors are floats: an integer or boolean factor is not an update ddiscan can score."""
    for key in pair.factor_keys:
        if file.tensors[key].dtype not in FLOAT_DTYPES:
            raise UnsupportedDtype(f"{file.path}: {key} has dtype {file.tensors[key].dtype}; LoRA factors must be "
                                   f"floating point ({', '.join(sorted(FLOAT_DTYPES))})")


def check_singular(pair: Pair, file: SafetensorsFile, r: int) -> None:
    """AdaLoRA's lora_E holds one value per rank: r × 1."""
    if pair.singular is None:
        return
    shape = tuple(file.tensors[pair.singular].shape)
    if shape not in ((r, 1), (r,)):
        raise ShapeMismatch(f"{file.path}: {pair.singular} is {list(shape)}, AdaLoRA's lora_E must be {r} × 1")


def check_magnitude(pair: Pair, file: SafetensorsFile, sizes: set[int]) -> None:
    """A DoRA magnitude holds one float per output feature (PEFT's; per embedding dimension
    of an embedding) or, in LyCORIS's ``dora_scale``, per input or output feature: checked
    before scoring, so that a report never passes what pruning would refuse."""
    if pair.dora is None:
        return
    info = file.tensors[pair.dora]
    if info.dtype not in FLOAT_DTYPES or info.numel not in sizes:
        raise ShapeMismatch(f"{file.path}: {pair.dora} is {info.dtype} {list(info.shape)}; a DoRA magnitude of "
                            f"this module must hold {' or '.join(map(str, sorted(sizes)))} floats")


def nonempty(shapes: tuple[int, int, int, str], where: str) -> tuple[int, int, int, str]:
    d, k, r, layout = shapes
    if min(d, k, r) == 0:
        raise ShapeMismatch(f"{where}: empty LoRA factors (d={d}, k={k}, rank {r})")
    return shapes


def base_fit(shape: tuple[int, ...], d: int, k: int) -> tuple[bool, bool]:
    """Whether a base tensor of ``shape`` is W0 as is, and whether it is W0ᵀ."""
    if len(shape) > 2:
        return (shape[0] == d and math.prod(shape[1:]) == k), False
    if len(shape) != 2:
        return False, False
    return tuple(shape) == (d, k), tuple(shape) == (k, d)
