"""Activation primitives: each forward beside its backward.

An activation maps pre-activations ``z`` of shape (m, n) to ``a`` of the same shape.
``forward(z) -> (a, residual)`` keeps what the backward needs; ``backward(residual, da) -> dz``
applies the vector-Jacobian product. The backward formulas follow the operation order of
PyTorch's own derivative kernels, so that results match autograd bit for bit where the math
allows (see README, "Parity").
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from fnmlp._rowsum import row_sum


@dataclasses.dataclass(frozen=True)
class Activation:
    """Base class: a hashable, static description of an elementwise or row-wise function."""

    name: ClassVar[str]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def backward(self, residual: Tensor | None, da: Tensor) -> Tensor:
        raise NotImplementedError

    def to_torch(self) -> nn.Module | None:
        """The equivalent ``torch.nn`` module (``None`` for the identity)."""
        raise NotImplementedError

    def __call__(self, z: Tensor) -> Tensor:
        return self.forward(z)[0]


@dataclasses.dataclass(frozen=True)
class Identity(Activation):
    """a = z;  dz = da."""

    name: ClassVar[str] = "identity"

    def forward(self, z):
        return z, None

    def backward(self, residual, da):
        return da

    def to_torch(self):
        return None


@dataclasses.dataclass(frozen=True)
class ReLU(Activation):
    """a = max(z, 0);  dz = da where a > 0, else 0 (the derivative at 0 is taken as 0)."""

    name: ClassVar[str] = "relu"

    def forward(self, z):
        a = torch.relu(z)
        return a, a

    def backward(self, a, da):
        return torch.where(a > 0, da, 0.0)

    def to_torch(self):
        return nn.ReLU()


@dataclasses.dataclass(frozen=True)
class Sigmoid(Activation):
    """a = 1 / (1 + exp(-z));  dz = da * (1 - a) * a."""

    name: ClassVar[str] = "sigmoid"

    def forward(self, z):
        a = torch.sigmoid(z)
        return a, a

    def backward(self, a, da):
        return da * (1 - a) * a

    def to_torch(self):
        return nn.Sigmoid()


@dataclasses.dataclass(frozen=True)
class Tanh(Activation):
    """a = tanh(z);  dz = da * (1 - a²), with 1 - a² as one fused multiply-add like autograd's."""

    name: ClassVar[str] = "tanh"

    def forward(self, z):
        a = torch.tanh(z)
        return a, a

    def backward(self, a, da):
        return da * torch.addcmul(torch.ones_like(a), a, a, value=-1)

    def to_torch(self):
        return nn.Tanh()


@dataclasses.dataclass(frozen=True)
class Softmax(Activation):
    """Row-wise a_i = exp(z_i - max z) / sum_j exp(z_j - max z);  dz = (da - sum_j da_j a_j) * a."""

    name: ClassVar[str] = "softmax"

    def forward(self, z):
        a = torch.softmax(z, dim=1)
        return a, a

    def backward(self, a, da):
        return (da - row_sum(da * a)) * a

    def to_torch(self):
        return nn.Softmax(dim=1)


_BY_NAME: dict[str, Activation] = {
    act.name: act for act in (Identity(), ReLU(), Sigmoid(), Tanh(), Softmax())
}
_ALIASES = {"linear": "identity", "none": "identity"}


def get_activation(activation: str | Activation | None) -> Activation:
    """Resolve a name (``"tanh"``, ``"relu"``, ...), ``None`` (identity) or an instance."""
    if activation is None:
        return _BY_NAME["identity"]
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = _ALIASES.get(activation.lower(), activation.lower())
        if key in _BY_NAME:
            return _BY_NAME[key]
        raise ValueError(
            f"unknown activation {activation!r}; supported: {', '.join(sorted(_BY_NAME))}"
        )
    raise TypeError(
        f"activation must be a name or an fnmlp activation, got {type(activation).__name__}"
    )


def activation_names() -> list[str]:
    return sorted(_BY_NAME)
