"""The quantized-base framework's scheme record (issue 17): placeholder on this branch, the
full module (registry and config lookup) comes from the framework's branch."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantScheme:
    name: str
    parts: Callable[[str, Collection[str]], dict[str, str] | None]
    dequantize: Callable[..., np.ndarray]
    describe: Callable[[dict], dict]


SCHEMES: tuple[QuantScheme, ...] = ()
