"""VeRA (PEFT's ``VeraConfig``): ΔW = diag(λ_b) · B_s · diag(λ_d) · A_s, a rank-r update.

One pair of frozen random matrices is shared by every module: ``base_model.vera_A``
(r × K) and ``base_model.vera_B`` (D × r), K and D the largest in- and out-features of
the targeted modules; a module of shape d × k uses ``vera_B[:d]`` and ``vera_A[:, :k]``
(peft/tuners/vera/layer.py, ``get_delta_weight``), scaled by its trained vectors
``<module>.vera_lambda_b`` (d) and ``<module>.vera_lambda_d`` (r). So ΔW = up · down with
up = λ_b ⊙ B_s (d × r) and down = λ_d ⊙ A_s (r × k), and the r × r core of SPEC.md §2
applies unchanged (SPEC.md §9). There is no scaling factor (s = 1).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeMismatch
from .io.reader import SafetensorsFile

__all__ = ["shared_keys", "vera_shapes", "vera_width", "vera_factors"]

_SHARED = ("vera_A", "vera_B")


def shared_keys(file: SafetensorsFile) -> tuple[str, str]:
    """The keys of the shared ``vera_A`` and ``vera_B`` (with or without PEFT's adapter
    name), or InputError: without them (``save_projection=False``) PEFT regenerates them from
    ``projection_prng_key`` with torch's generator, which ddiscan does not reproduce."""
    found = []
    for name in _SHARED:
        keys = [k for k in file.keys() if k.split(".")[-1] == name or k.split(".")[-2:-1] == [name]]
        if len(keys) != 1:
            have = "none" if not keys else ", ".join(keys)
            raise InputError(f"{file.path}: a VeRA adapter needs exactly one shared {name} tensor (found {have}); "
                             "save it with save_projection=True")
        found.append(keys[0])
    return found[0], found[1]


def vera_shapes(up: str, down: str, file: SafetensorsFile) -> tuple[int, int, int, str]:
    """(d, K, r, "linear"): λ_b holds d values, λ_d r; K, the shared vera_A's width, bounds k
    (the base weight gives k itself: :func:`vera_width`)."""
    a_key, b_key = shared_keys(file)
    lambda_b, lambda_d = file.tensors[up].shape, file.tensors[down].shape
    a, b = file.tensors[a_key].shape, file.tensors[b_key].shape
    where = f"{file.path}: {up} {list(lambda_b)} / {down} {list(lambda_d)} / {a_key} {list(a)} / {b_key} {list(b)}"
    if len(lambda_b) != 1 or len(lambda_d) != 1 or len(a) != 2 or len(b) != 2:
        raise ShapeMismatch(f"{where}: VeRA's lambda_b and lambda_d are vectors, vera_A and vera_B matrices")
    d, r = lambda_b[0], lambda_d[0]
    if a[0] != r or b[1] != r or d > b[0]:
        raise ShapeMismatch(f"{where}: VeRA's vera_A is r × in, vera_B out × r, lambda_d r and lambda_b out "
                            f"(at most vera_B's {b[0]} rows)")
    return d, a[1], r, "linear"


def vera_width(shape: tuple[int, ...], d: int, widest: int) -> int:
    """k of a VeRA module from its base weight's ``shape`` (d × k, or k × d for a Conv1D):
    the base fixes it, the shared vera_A only bounds it (k ≤ ``widest``)."""
    if len(shape) == 2 and shape[0] == d and shape[1] <= widest:
        return shape[1]
    if len(shape) == 2 and shape[1] == d and shape[0] <= widest:
        return shape[0]
    return widest


def vera_factors(up: str, down: str, k: int, file: SafetensorsFile) -> tuple[np.ndarray, np.ndarray]:
    """``(λ_b ⊙ vera_B[:d], λ_d ⊙ vera_A[:, :k])`` as float64, d × r and r × k."""
    a_key, b_key = shared_keys(file)
    lambda_b = np.asarray(file.array(up), dtype=np.float64)
    lambda_d = np.asarray(file.array(down), dtype=np.float64)
    shared_b = np.asarray(file.array(b_key), dtype=np.float64)[: lambda_b.shape[0]]
    shared_a = np.asarray(file.array(a_key), dtype=np.float64)[:, :k]
    return lambda_b[:, None] * shared_b, lambda_d[:, None] * shared_a
