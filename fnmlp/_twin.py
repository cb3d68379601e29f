"""The ``nn.Module`` twin: the same network as ``torch.nn`` modules, and back."""

from __future__ import annotations

import torch
from torch import nn

from fnmlp._activations import (ELU, GELU, Activation, Identity, LeakyReLU, LogSoftmax, ReLU,
                                SiLU, Sigmoid, Softmax, Softplus, Tanh)
from fnmlp._dense import DenseParams
from fnmlp._model import MLP, Dense, Params


def to_torch(model: MLP, params: Params) -> nn.Sequential:
    """An ``nn.Sequential`` of ``nn.Linear`` and activation modules holding copies of params."""
    like = model.check_params(params)
    modules: list[nn.Module] = []
    for (n_in, n_out), layer, p in zip(model.shapes, model.layers, params):
        linear = nn.Linear(n_in, n_out, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            linear.weight.copy_(p.weight)
            linear.bias.copy_(p.bias)
        modules.append(linear)
        activation = layer.activation.to_torch()
        if activation is not None:
            modules.append(activation)
    return nn.Sequential(*modules)


def _row_wise(activation: type[Activation]):
    def convert(module) -> Activation:
        if module.dim not in (1, -1):
            name = type(module).__name__
            raise ValueError(f"nn.{name}(dim={module.dim}) is not supported: fnmlp's "
                             f"{activation.name} is row-wise, use nn.{name}(dim=1)")
        return activation()
    return convert


_FROM_TORCH = {
    nn.Identity: lambda module: Identity(),
    nn.ReLU: lambda module: ReLU(),
    nn.Sigmoid: lambda module: Sigmoid(),
    nn.Tanh: lambda module: Tanh(),
    nn.Softmax: _row_wise(Softmax),
    nn.LogSoftmax: _row_wise(LogSoftmax),
    nn.LeakyReLU: lambda module: LeakyReLU(module.negative_slope),
    nn.ELU: lambda module: ELU(module.alpha),
    nn.GELU: lambda module: GELU(module.approximate),
    nn.SiLU: lambda module: SiLU(),
    nn.Softplus: lambda module: Softplus(module.beta, module.threshold),
}


def supported_torch_modules() -> list[str]:
    return ["nn.Linear"] + [f"nn.{cls.__name__}" for cls in _FROM_TORCH]


def from_torch(module: nn.Module) -> tuple[MLP, Params]:
    """``(model, params)`` for an ``nn.Sequential`` of ``nn.Linear`` and supported activations.

    Each ``nn.Linear`` may be followed by at most one activation module. Parameters are copied.
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"from_torch takes an nn.Sequential, got {type(module).__name__}")
    supported = ", ".join(supported_torch_modules())
    layers: list[Dense] = []
    params: list[DenseParams] = []
    in_features = None
    pending: nn.Linear | None = None
    pending_activation: Activation | None = None

    def close_layer():
        layers.append(Dense(pending.out_features, pending_activation))
        params.append(DenseParams(weight=pending.weight.detach().clone(),
                                  bias=pending.bias.detach().clone()))

    for index, child in enumerate(module):
        if isinstance(child, nn.Linear):
            if child.bias is None:
                raise ValueError(f"module [{index}] is nn.Linear without bias; fnmlp layers "
                                 "always have a bias")
            if pending is not None:
                close_layer()
                if child.in_features != pending.out_features:
                    raise ValueError(f"module [{index}] expects {child.in_features} inputs but "
                                     f"the layer before outputs {pending.out_features}")
            else:
                in_features = child.in_features
            pending, pending_activation = child, None
        elif type(child) in _FROM_TORCH:
            if pending is None:
                raise ValueError(f"module [{index}] ({type(child).__name__}) comes before any "
                                 "nn.Linear; an fnmlp network starts with a dense layer")
            activation = _FROM_TORCH[type(child)](child)
            if isinstance(activation, Identity):
                continue
            if pending_activation is not None:
                raise ValueError(f"module [{index}] ({type(child).__name__}) is a second "
                                 "activation after one nn.Linear; fnmlp allows one per layer")
            pending_activation = activation
        else:
            raise TypeError(f"module [{index}] is {type(child).__name__}, which fnmlp does not "
                            f"support; supported modules: {supported}")
    if pending is None:
        raise ValueError("the nn.Sequential holds no nn.Linear")
    close_layer()
    dtypes = {(p.weight.dtype, p.weight.device) for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"the nn.Linear layers differ in dtype or device: {sorted(map(str, dtypes))}")
    return MLP(in_features, layers), tuple(params)
