"""Parameter initializers for one dense layer, drawing from an explicit generator."""

from __future__ import annotations

import math
from typing import Callable

import torch

from fnmlp._dense import DenseParams

Initializer = Callable[[int, int, torch.Generator, torch.dtype], DenseParams]


def torch_default(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype):
    """``nn.Linear``'s default: W, b ~ U(-1/sqrt(n_in), 1/sqrt(n_in)), drawn W first, then b.

    With a generator seeded like the global one, the values equal those of ``nn.Linear``.
    """
    device = generator.device
    weight = torch.empty(n_out, n_in, dtype=dtype, device=device)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(n_in)
    bias = torch.empty(n_out, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
    return DenseParams(weight=weight, bias=bias)


def normal(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype):
    """The seed notebook's draw: W, b ~ N(0, 1); W drawn as (n_in, n_out) like the notebook."""
    device = generator.device
    weight = torch.randn(n_in, n_out, dtype=dtype, device=device, generator=generator)
    bias = torch.randn(n_out, dtype=dtype, device=device, generator=generator)
    return DenseParams(weight=weight.t().contiguous(), bias=bias)


INITIALIZERS: dict[str, Initializer] = {"torch": torch_default, "normal": normal}


def get_initializer(name: str) -> Initializer:
    if name not in INITIALIZERS:
        raise ValueError(f"unknown init {name!r}; supported: {', '.join(sorted(INITIALIZERS))}")
    return INITIALIZERS[name]
