"""The ``nn.Module`` twin: the same network as ``torch.nn`` modules, and back."""

from __future__ import annotations

import torch
from torch import nn

from fnmlp._activations import (ELU, GELU, Activation, Identity, LeakyReLU, LogSoftmax, ReLU,
                                SiLU, Sigmoid, Softmax, Softplus, Tanh)
from fnmlp._dense import DenseParams
from fnmlp._dropout import keep_mask
from fnmlp._losses import mse
from fnmlp._model import MLP, Dense, Params
from fnmlp._norm import LayerNormParams


class SharedMaskDropout(nn.Module):
    """The twin's dropout drawing its masks from fnmlp's source: ``fnmlp.dropout_key`` keys
    and the layer's index, so that a twin and fnmlp drop the same units. Set ``key`` before
    each training forward (``set_dropout_key``); in eval mode, or with no key, it is the
    identity."""

    def __init__(self, p: float, layer: int):
        super().__init__()
        self.p, self.layer, self.key = p, layer, None

    def forward(self, a):
        if not self.training or self.key is None:
            return a
        return a * (keep_mask(self.key.to(a.device), self.layer, tuple(a.shape), self.p, a.dtype)
                    * (1 / (1 - self.p)))

    def extra_repr(self):
        return f"p={self.p}, layer={self.layer}"


def set_dropout_key(module: nn.Module, key) -> None:
    """Give every ``SharedMaskDropout`` in ``module`` the key of the next training step."""
    for child in module.modules():
        if isinstance(child, SharedMaskDropout):
            child.key = key


def to_torch(model: MLP, params: Params, *, shared_dropout: bool = False) -> nn.Sequential:
    """An ``nn.Sequential`` holding copies of params: per layer ``nn.Linear``, then
    ``nn.LayerNorm``, the activation module and ``nn.Dropout`` where the layer has them.

    ``shared_dropout=True`` uses ``SharedMaskDropout`` instead of ``nn.Dropout``, so that the
    twin drops the same units as fnmlp given the same key (for parity runs).
    """
    like = model.check_params(params)
    factory = {"dtype": like.dtype, "device": like.device}
    modules: list[nn.Module] = []
    for index, ((n_in, n_out), layer, p) in enumerate(zip(model.shapes, model.layers, params)):
        linear = nn.utils.skip_init(nn.Linear, n_in, n_out, **factory)  # no global RNG draw
        copies = [(linear.weight, p.weight), (linear.bias, p.bias)]
        modules.append(linear)
        if layer.layer_norm:
            norm = nn.LayerNorm(n_out, eps=layer.norm_eps, **factory)
            copies += [(norm.weight, p.norm.weight), (norm.bias, p.norm.bias)]
            modules.append(norm)
        activation = layer.activation.to_torch()
        if activation is not None:
            modules.append(activation)
        if layer.dropout:
            modules.append(SharedMaskDropout(layer.dropout, index) if shared_dropout
                           else nn.Dropout(layer.dropout))
        with torch.no_grad():
            for target, source in copies:
                target.copy_(source)
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
    return (["nn.Linear", "nn.LayerNorm", "nn.Dropout"]
            + [f"nn.{cls.__name__}" for cls in _FROM_TORCH])


_ORDER = {"linear": 0, "norm": 1, "activation": 2, "dropout": 3}


def _kind(child: nn.Module) -> str | None:
    if isinstance(child, nn.Linear):
        return "linear"
    if isinstance(child, nn.LayerNorm):
        return "norm"
    if isinstance(child, (nn.Dropout, SharedMaskDropout)):
        return "dropout"
    if type(child) in _FROM_TORCH:
        return "activation"
    return None


def from_torch(module: nn.Module) -> tuple[MLP, Params]:
    """``(model, params)`` for an ``nn.Sequential`` of layers, each ``nn.Linear`` then,
    optionally and in this order, ``nn.LayerNorm``, one supported activation and
    ``nn.Dropout``. ``nn.Identity`` may stand anywhere. Parameters are copied."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"from_torch takes an nn.Sequential, got {type(module).__name__}")
    supported = ", ".join(supported_torch_modules())
    groups: list[dict] = []
    for index, child in enumerate(module):
        kind = _kind(child)
        name = type(child).__name__
        if kind is None:
            raise TypeError(f"module [{index}] is {name}, which fnmlp does not support; "
                            f"supported modules: {supported}")
        if kind == "activation" and isinstance(_FROM_TORCH[type(child)](child), Identity):
            continue
        if kind == "linear":
            if child.bias is None:
                raise ValueError(f"module [{index}] is nn.Linear without bias; fnmlp layers "
                                 "always have a bias")
            if groups and child.in_features != groups[-1]["linear"].out_features:
                raise ValueError(f"module [{index}] expects {child.in_features} inputs but "
                                 f"the layer before outputs {groups[-1]['linear'].out_features}")
            groups.append({"linear": child, "last": "linear"})
            continue
        if not groups:
            raise ValueError(f"module [{index}] ({name}) comes before any nn.Linear; an fnmlp "
                             "network starts with a dense layer")
        group = groups[-1]
        if kind in group:
            what = "activation" if kind == "activation" else name
            raise ValueError(f"module [{index}] ({name}) is a second {what} after one "
                             "nn.Linear; fnmlp allows one per layer")
        if _ORDER[kind] < _ORDER[group["last"]]:
            raise ValueError(f"module [{index}] ({name}) is out of order: a layer is nn.Linear, "
                             "then nn.LayerNorm, then the activation, then nn.Dropout")
        if kind == "norm" and (child.normalized_shape != (group["linear"].out_features,)
                               or child.weight is None or child.bias is None):
            width = group["linear"].out_features
            raise ValueError(f"module [{index}] must be nn.LayerNorm({width}) with "
                             "elementwise_affine=True and bias=True")
        group[kind], group["last"] = child, kind
    if not groups:
        raise ValueError("the nn.Sequential holds no nn.Linear")
    layers, params = [], []
    for group in groups:
        linear, norm = group["linear"], group.get("norm")
        activation = group.get("activation")
        layers.append(Dense(
            linear.out_features,
            _FROM_TORCH[type(activation)](activation) if activation is not None else None,
            layer_norm=norm is not None, dropout=group["dropout"].p if "dropout" in group else 0.0,
            norm_eps=norm.eps if norm is not None else 1e-5))
        norm_params = None
        if norm is not None:
            norm_params = LayerNormParams(norm.weight.detach().clone(), norm.bias.detach().clone())
        params.append(DenseParams(linear.weight.detach().clone(), linear.bias.detach().clone(),
                                  norm_params))
    model = MLP(groups[0]["linear"].in_features, layers)
    leaves = [t for p in params for t in (p.weight, p.bias)]
    if len({(t.dtype, t.device) for t in leaves}) > 1:
        raise ValueError("the modules' parameters differ in dtype or device: "
                         f"{sorted({f'{t.dtype} on {t.device}' for t in leaves})}")
    return model, tuple(params)


class TorchTwin:
    """The ``nn.Module`` twin wired for training: the module (``to_torch``), the matching
    ``torch.optim`` optimizer, its ``lr_scheduler`` for a schedule, gradient clipping for
    ``clip_by_global_norm``, and the loss module, so that parity runs need no hand wiring.

        twin = fnmlp.TorchTwin(model, params, optimizer=fnmlp.adam(1e-3),
                               loss=fnmlp.cross_entropy)
        twin.step(x, y, key)          # one autograd + torch.optim step, same masks as fnmlp
    """

    def __init__(self, model: MLP, params: Params, *, optimizer, loss=mse,
                 shared_dropout: bool = True):
        self.module = to_torch(model, params, shared_dropout=shared_dropout)
        self.optimizer = optimizer.to_torch(self.module.parameters())
        schedule = optimizer.schedule
        self.scheduler = schedule.to_torch(self.optimizer) if schedule is not None else None
        self.max_norm = getattr(optimizer, "max_norm", None)
        self.loss = loss.to_torch()

    def step(self, x, y, key=None):
        """One training step; returns the loss (a detached 0-d tensor)."""
        self.module.train()
        set_dropout_key(self.module, key)
        self.optimizer.zero_grad()
        value = self.loss(self.module(x), y)
        value.backward()
        if self.max_norm is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.max_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return value.detach()

    def evaluate(self, x, y) -> float:
        self.module.eval()
        with torch.no_grad():
            return self.loss(self.module(x), y).item()

    def params(self) -> Params:
        """Copies of the module's current parameters, as fnmlp parameters."""
        return from_torch(self.module)[1]
