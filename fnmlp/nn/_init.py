"""Initializers of an affine layer's (weight (n_out, n_in), bias (n_out,)), drawing from an
explicit generator."""

from __future__ import annotations

import math
from typing import Callable

import torch

Initializer = Callable[[int, int, torch.Generator, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def torch_default(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype):
    """``nn.Linear``'s default: W, b ~ U(-1/sqrt(n_in), 1/sqrt(n_in)), drawn W first, then b.

    With a generator seeded like the global one, the values equal those of ``nn.Linear``.
    """
    device = generator.device
    weight = torch.empty(n_out, n_in, dtype=dtype, device=device)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(n_in)
    bias = torch.empty(n_out, dtype=dtype, device=device)
    bias.uniform_(-bound, bound, generator=generator)
    return weight, bias


def normal(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype):
    """The seed notebook's draw: W, b ~ N(0, 1); W drawn as (n_in, n_out) like the notebook."""
    device = generator.device
    weight = torch.randn(n_in, n_out, dtype=dtype, device=device, generator=generator)
    bias = torch.randn(n_out, dtype=dtype, device=device, generator=generator)
    return weight.t().contiguous(), bias


def _weight_then_zero_bias(draw):
    """An initializer drawing W (n_out, n_in) in place with ``draw``; b = 0."""

    def initializer(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype):
        weight = torch.empty(n_out, n_in, dtype=dtype, device=generator.device)
        draw(weight, generator)
        return weight, torch.zeros(n_out, dtype=dtype, device=generator.device)

    initializer.__doc__ = draw.__doc__
    return initializer


def _xavier_uniform(w, g):
    """Glorot: W ~ U(±sqrt(6 / (n_in + n_out)))."""
    torch.nn.init.xavier_uniform_(w, generator=g)


def _xavier_normal(w, g):
    """Glorot: W ~ N(0, 2 / (n_in + n_out))."""
    torch.nn.init.xavier_normal_(w, generator=g)


def _kaiming_uniform(w, g):
    """He (fan_in, ReLU gain): W ~ U(±sqrt(6 / n_in))."""
    torch.nn.init.kaiming_uniform_(w, nonlinearity="relu", generator=g)


def _kaiming_normal(w, g):
    """He (fan_in, ReLU gain): W ~ N(0, 2 / n_in)."""
    torch.nn.init.kaiming_normal_(w, nonlinearity="relu", generator=g)


def _zeros(w, g):
    """W = 0."""
    w.zero_()


def _glorot_both(factor: float) -> Initializer:
    """scikit-learn's MLP draw: W and b ~ U(±sqrt(factor / (n_in + n_out))), W drawn first."""

    def initializer(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype):
        bound = math.sqrt(factor / (n_in + n_out))
        device = generator.device
        weight = torch.empty(n_out, n_in, dtype=dtype, device=device)
        weight.uniform_(-bound, bound, generator=generator)
        bias = torch.empty(n_out, dtype=dtype, device=device)
        bias.uniform_(-bound, bound, generator=generator)
        return weight, bias

    initializer.__doc__ = (f"scikit-learn's MLP: W, b ~ U(±sqrt({factor:g} / (n_in + n_out)))"
                           f"{' (its logistic activation)' if factor == 2 else ''}.")
    return initializer


INITIALIZERS: dict[str, Initializer] = {
    "torch": torch_default,
    "normal": normal,
    "xavier_uniform": _weight_then_zero_bias(_xavier_uniform),
    "xavier_normal": _weight_then_zero_bias(_xavier_normal),
    "kaiming_uniform": _weight_then_zero_bias(_kaiming_uniform),
    "kaiming_normal": _weight_then_zero_bias(_kaiming_normal),
    "zeros": _weight_then_zero_bias(_zeros),
    "sklearn": _glorot_both(6.0),
    "sklearn_logistic": _glorot_both(2.0),
}
ALIASES = {"glorot_uniform": "xavier_uniform", "glorot_normal": "xavier_normal",
           "he_uniform": "kaiming_uniform", "he_normal": "kaiming_normal"}


def get_initializer(name: str) -> Initializer:
    name = ALIASES.get(name, name)
    if name not in INITIALIZERS:
        raise ValueError(f"unknown init {name!r}; supported: {', '.join(sorted(INITIALIZERS))}")
    return INITIALIZERS[name]
