"""Activation primitives: each forward beside its backward.

An activation maps pre-activations ``z`` (m, n) to ``a`` (m, n); it has no parameters and no
state. ``forward`` keeps what the backward needs as its residual; ``backward`` applies the
vector-Jacobian product. The backward formulas follow the operation order of PyTorch's own
derivative kernels, so that results match autograd bit for bit where the math allows (see
docs/guide/torch-twin.md).

Each class is the one place an activation is declared: defining it registers it (its spec
name, its ``name`` and ``aliases`` for ``get_activation``, its ``torch_module`` twin); the
tables below are read from the registry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, TypeGuard

import torch
from torch import Tensor, nn

from fnmlp import _registry
from fnmlp.nn._primitive import EVAL, Primitive
from fnmlp.nn._rowsum import log_softmax_backward, softmax_backward


@dataclasses.dataclass(frozen=True)
class Activation(Primitive, abstract=True):
    """Base class of the activations.

    ``name``: the string that selects one (``get_activation``); ``aliases``: more strings for
    it; ``variants``: names of preset options (``{"gelu_tanh": {"approximate": "tanh"}}``);
    ``torch_module``: the ``torch.nn`` module taking the same options by name, its twin (set
    none, and register a twin, where the options differ).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    torch_module: ClassVar[type[nn.Module] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)  # registers fnmlp's own
        module = cls.__dict__.get("torch_module")
        if module is not None and _registry.entry(cls) is not None:
            _registry.set_twin(cls, _registry.options_twin(cls, module))

    def __call__(self, z: Tensor) -> Tensor:
        """The activation of ``z``."""
        return self.forward((), z, (), EVAL)[0]


@dataclasses.dataclass(frozen=True)
class Identity(Activation):
    """a = z;  dz = da."""

    name: ClassVar[str] = "identity"
    aliases = ("linear", "none")
    torch_module = nn.Identity

    def forward(self, params, z, state, context):
        return z, None, state

    def backward(self, params, residual, da, need_input_grad=True):
        return da, ()


@dataclasses.dataclass(frozen=True)
class ReLU(Activation):
    """a = max(z, 0);  dz = 0 where a <= 0, else da (the derivative at 0 is taken as 0; NaN
    passes the gradient through, as autograd's ``threshold_backward``)."""

    name: ClassVar[str] = "relu"
    torch_module = nn.ReLU

    def forward(self, params, z, state, context):
        a = torch.relu(z)
        return a, a, state

    def backward(self, params, a, da, need_input_grad=True):
        # autograd's own kernel for relu: 0 where a <= 0 (10x faster than a where on CPU)
        return torch.ops.aten.threshold_backward(da, a, 0), ()


@dataclasses.dataclass(frozen=True)
class Sigmoid(Activation):
    """a = 1 / (1 + exp(-z));  dz = da * (1 - a) * a."""

    name: ClassVar[str] = "sigmoid"
    torch_module = nn.Sigmoid

    def forward(self, params, z, state, context):
        a = torch.sigmoid(z)
        return a, a, state

    def backward(self, params, a, da, need_input_grad=True):
        return da * (1 - a) * a, ()


@dataclasses.dataclass(frozen=True)
class Tanh(Activation):
    """a = tanh(z);  dz = da * (1 - a²), with 1 - a² as one fused multiply-add like autograd's."""

    name: ClassVar[str] = "tanh"
    torch_module = nn.Tanh

    def forward(self, params, z, state, context):
        a = torch.tanh(z)
        return a, a, state

    def backward(self, params, a, da, need_input_grad=True):
        return da * torch.addcmul(torch.ones_like(a), a, a, value=-1), ()


@dataclasses.dataclass(frozen=True)
class Softmax(Activation):
    """Row-wise a_i = exp(z_i - max z) / sum_j exp(z_j - max z);  dz = (da - sum_j da_j a_j) * a."""

    name: ClassVar[str] = "softmax"  # twin: nn.Softmax(dim=1), in interop

    def forward(self, params, z, state, context):
        a = torch.softmax(z, dim=1)
        return a, (a, context.lane_order_sums), state  # how backward sums rows

    def backward(self, params, residual, da, need_input_grad=True):
        a, exact = residual
        return softmax_backward(da, a, exact), ()


@dataclasses.dataclass(frozen=True)
class LeakyReLU(Activation):
    """a = z if z > 0 else slope·z;  dz = da where z > 0, else slope·da."""

    negative_slope: float = 0.01
    name: ClassVar[str] = "leaky_relu"
    torch_module = nn.LeakyReLU

    def forward(self, params, z, state, context):
        return torch.nn.functional.leaky_relu(z, self.negative_slope), z, state

    def backward(self, params, z, da, need_input_grad=True):
        return torch.where(z > 0, da, da * self.negative_slope), ()


@dataclasses.dataclass(frozen=True)
class ELU(Activation):
    """a = z if z > 0 else α(exp(z) - 1);  dz = da where z > 0, else da·α·exp(z)."""

    alpha: float = 1.0
    name: ClassVar[str] = "elu"
    torch_module = nn.ELU

    def forward(self, params, z, state, context):
        return torch.nn.functional.elu(z, self.alpha), z, state

    def backward(self, params, z, da, need_input_grad=True):
        return torch.where(z > 0, da, da * self.alpha * torch.exp(z)), ()


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_INV_SQRT_2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class GELU(Activation):
    """Exact: a = z·Φ(z), dz = da·(Φ(z) + z·φ(z)).
    approximate="tanh": a = z/2·(1 + t), t = tanh(k(z + 0.044715 z³)), k = sqrt(2/π);
    dz = da·(½(1 + t) + ½z(1 - t²)·k(1 + 3·0.044715 z²))."""

    approximate: str = "none"
    name: ClassVar[str] = "gelu"
    variants = {"gelu_tanh": {"approximate": "tanh"}}
    torch_module = nn.GELU

    def __post_init__(self):
        if self.approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got "
                             f"{self.approximate!r}")

    def forward(self, params, z, state, context):
        return torch.nn.functional.gelu(z, approximate=self.approximate), z, state

    def backward(self, params, z, da, need_input_grad=True):
        if self.approximate == "tanh":
            inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
            t = torch.tanh(inner)
            d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
            return da * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * d_inner), ()
        cdf = 0.5 * (1 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return da * (cdf + z * pdf), ()


@dataclasses.dataclass(frozen=True)
class SiLU(Activation):
    """a = z·σ(z);  dz = da·σ(z)·(1 + z(1 - σ(z)))."""

    name: ClassVar[str] = "silu"
    aliases = ("swish",)
    torch_module = nn.SiLU

    def forward(self, params, z, state, context):
        return torch.nn.functional.silu(z), z, state

    def backward(self, params, z, da, need_input_grad=True):
        s = torch.sigmoid(z)
        return da * s * (1 + z * (1 - s)), ()


@dataclasses.dataclass(frozen=True)
class Softplus(Activation):
    """a = log(1 + exp(βz))/β, or z where βz > threshold;
    dz = da·e/(e + 1) with e = exp(βz), or da where βz > threshold."""

    beta: float = 1.0
    threshold: float = 20.0
    name: ClassVar[str] = "softplus"
    torch_module = nn.Softplus

    def forward(self, params, z, state, context):
        return torch.nn.functional.softplus(z, self.beta, self.threshold), z, state

    def backward(self, params, z, da, need_input_grad=True):
        scaled = z * self.beta
        e = torch.exp(torch.clamp(scaled, max=self.threshold))  # no overflow past threshold
        return torch.where(scaled > self.threshold, da, da * e / (e + 1)), ()


@dataclasses.dataclass(frozen=True)
class LogSoftmax(Activation):
    """Row-wise a = z - log sum_j exp(z_j);  dz = da - exp(a)·sum_j da_j."""

    name: ClassVar[str] = "log_softmax"  # twin: nn.LogSoftmax(dim=1), in interop

    def forward(self, params, z, state, context):
        a = torch.log_softmax(z, dim=1)
        return a, (a, context.lane_order_sums), state  # how backward sums rows

    def backward(self, params, residual, da, need_input_grad=True):
        a, exact = residual
        return log_softmax_backward(da, a, exact), ()


def _table() -> tuple[dict[str, Activation], dict[str, str]]:
    """``(activations by name, aliases)``, read from the registry."""
    return _build_table(_registry.generation())


@functools.lru_cache(maxsize=1)
def _build_table(generation: int) -> tuple[dict[str, Activation], dict[str, str]]:
    by_name: dict[str, Activation] = {}
    aliases: dict[str, str] = {}
    for entry in _registry.entries("primitive"):
        by_name.update(named_instances(entry.cls))
        if _names_itself(entry.cls):  # only such a class has aliases of its own
            aliases.update(dict.fromkeys(_own_aliases(entry.cls), entry.cls.name))
    return by_name, aliases


def named_instances(cls: type) -> dict[str, Activation]:
    """The instances ``cls`` offers by name: its own ``name`` (default options) and its
    ``variants``; none for a class that is no activation or inherits its ``name``."""
    if not _names_itself(cls):
        return {}
    found = {cls.name: cls()}
    for name, options in cls.__dict__.get("variants", {}).items():
        found[name] = cls(**options)
    return found


def _names_itself(cls: type) -> TypeGuard[type[Activation]]:
    """Whether ``cls`` is an activation with a ``name`` of its own (not inherited)."""
    return isinstance(cls, type) and issubclass(cls, Activation) and "name" in cls.__dict__


def _own_aliases(cls: type) -> tuple[str, ...]:
    return cls.__dict__.get("aliases", ()) if _names_itself(cls) else ()


def new_names(cls: type) -> list[str]:
    """The names (and aliases) ``cls`` would select by; raises ``ValueError`` for one that
    another activation holds already."""
    names = [*named_instances(cls), *_own_aliases(cls)]
    by_name, aliases = _table()
    for name in names:
        holder = type(by_name[name]).__name__ if name in by_name else \
            type(by_name[aliases[name]]).__name__ if name in aliases else None
        if holder is not None:
            raise ValueError(f"the activation name {name!r} is taken by {holder}: give "
                             f"{cls.__name__} a name of its own")
    return names


def get_activation(activation: str | Activation | None) -> Activation:
    """Resolve a name (``"tanh"``, ``"relu"``, ...), ``None`` (identity) or an instance."""
    if activation is None:
        return _table()[0]["identity"]
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        by_name, aliases = _table()
        key = aliases.get(activation.lower(), activation.lower())
        if key in by_name:
            return by_name[key]
        raise ValueError(
            f"unknown activation {activation!r}; supported: {', '.join(sorted(by_name))}"
        )
    raise TypeError(
        f"activation must be a name or an fnmlp activation, got {type(activation).__name__}"
    )


def activation_names() -> list[str]:
    """Every name ``get_activation`` takes, aliases aside."""
    return sorted(_table()[0])
