"""The ``nn.Module`` twin: the same network as ``torch.nn`` modules, and back, read from the
registry (``fnmlp.interop._registry``)."""

from __future__ import annotations

import torch
from torch import nn

from fnmlp._tree import tree_leaves
from fnmlp.interop._registry import (SharedMaskDropout, loss_to_torch, module_for,
                                     optimizer_to_torch, rule_for_module, supported_modules)
from fnmlp.nn import MLP, CrossEntropy, Params, State, mse


def set_dropout_key(module: nn.Module, key) -> None:
    """Give every ``SharedMaskDropout`` in ``module`` the key of the next training step."""
    for child in module.modules():
        if isinstance(child, SharedMaskDropout):
            child.key = key


def to_torch(model: MLP, params: Params, state: State | None = None, *,
             shared_dropout: bool = False) -> nn.Sequential:
    """An ``nn.Sequential`` with one module per primitive, holding copies of ``params`` and
    ``state`` (``BatchNorm``'s running statistics).

    Arguments:
        model, params, state: the network, its parameters and its state; a model that keeps
            running statistics (``BatchNorm``) needs ``state``, as ``model.apply`` does: the
            one from training, or ``model.init_state(...)`` for fresh statistics.
        shared_dropout: use ``SharedMaskDropout`` instead of ``nn.Dropout``, so that the twin
            drops the same units as fnmlp given the same key (for parity runs).
    """
    if not isinstance(model, MLP):
        hint = ("; it is torch already (fnmlp.from_torch(module) makes an fnmlp model of it)"
                if isinstance(model, nn.Module) else
                "; an ensemble's member k is to_torch(ensemble.model, ensemble.member(params, k))"
                if hasattr(model, "member") else "")
        raise TypeError(f"to_torch takes an fnmlp.MLP, got {type(model).__name__}{hint}")
    like = model.check_params(params)
    if state is None and model.has_state:  # fresh statistics would predict unlike the fit
        raise ValueError("this model keeps running statistics (BatchNorm): pass state=... "
                         "from training, or state=model.init_state(...) for fresh ones")
    state = model.init_state(dtype=like.dtype, device=like.device) if state is None else state
    model.check_state(state, like)
    modules = [module_for(layer, p, s, n_in, shared_dropout)
               for layer, p, s, n_in in zip(model.layers, params, state, model.widths)]
    return nn.Sequential(*modules)


def from_torch(module: nn.Module) -> tuple[MLP, Params, State]:
    """``(model, params, state)`` for an ``nn.Sequential`` of supported modules (copies).

    Each module becomes one primitive: ``nn.Linear`` (with bias), ``nn.LayerNorm``,
    ``nn.BatchNorm1d``, ``nn.Dropout``, the activations and the modules of primitives given to
    ``fnmlp.register`` (``supported_modules()``); the input width is the first module's that
    fixes one (``nn.Linear``'s, a norm's).
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"from_torch takes an nn.Sequential, got {type(module).__name__}")
    layers, params, state = [], [], []
    in_features = width = None
    for index, child in enumerate(module):
        rule = rule_for_module(child)
        name = type(child).__name__
        if rule is None:
            raise TypeError(f"module [{index}] is {name}, which fnmlp does not support; "
                            f"supported modules: {', '.join(supported_modules())}")
        wanted = rule.in_width(child)
        if wanted is not None:
            if width is not None and wanted != width:
                raise ValueError(f"module [{index}] ({name}) expects {wanted} inputs but the "
                                 f"module before outputs {width}")
            if in_features is None:
                in_features = width = wanted
        try:
            primitive, p, s = rule.from_torch(child)
        except ValueError as error:
            raise ValueError(f"module [{index}]: {error}") from None
        layers.append(primitive)
        params.append(p)
        state.append(s)
        if width is not None:
            width = primitive.out_features(width)
    if in_features is None:
        raise ValueError("the nn.Sequential holds no nn.Linear (nor a norm) to fix its input "
                         "width")
    tensors = [t for t in tree_leaves((params, state)) if t.is_floating_point()]
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        raise ValueError("the modules' parameters differ in dtype or device: "
                         f"{sorted({f'{t.dtype} on {t.device}' for t in tensors})}")
    return MLP(in_features, layers), tuple(params), tuple(state)


class TorchTwin:
    """The ``nn.Module`` twin wired for training: the module (``to_torch``), the matching
    ``torch.optim`` optimizer, its ``lr_scheduler`` for a schedule, gradient clipping for
    ``clip_by_global_norm``, and the loss module, so that parity runs need no hand wiring.

        twin = fnmlp.TorchTwin(model, params, optimizer=fnmlp.adam(1e-3),
                               loss=fnmlp.cross_entropy)
        twin.step(x, y, key)          # one autograd + torch.optim step, same masks as fnmlp

    Arguments:
        model, params, state: the network to copy (``state``: ``BatchNorm``'s statistics;
            fresh ones, ``model.init_state``, if None, as ``fnmlp.fit`` starts).
        optimizer: an fnmlp optimizer; loss: an fnmlp loss.
        shared_dropout: draw fnmlp's dropout masks (default) instead of ``nn.Dropout``'s.
    """

    def __init__(self, model: MLP, params: Params, *, optimizer, loss=mse,
                 state: State | None = None, shared_dropout: bool = True):
        if state is None and isinstance(model, MLP):  # fresh statistics, as fnmlp.fit starts
            like = model.check_params(params)
            state = model.init_state(dtype=like.dtype, device=like.device)
        self.module = to_torch(model, params, state, shared_dropout=shared_dropout)
        self.optimizer, self.scheduler, self.clip_norms = optimizer_to_torch(
            optimizer, self.module.parameters())
        like = next(self.module.parameters())
        self.loss = loss_to_torch(loss, dtype=like.dtype, device=like.device)
        self._per_element = loss_to_torch(loss, reduction="none", dtype=like.dtype,
                                          device=like.device)
        self._mean = loss.reduction == "mean"
        self._fnmlp_loss = loss

    def step(self, x, y, key=None, sample_weight=None):
        """One training step (autograd, clipping, ``optimizer.step``, ``scheduler.step``);
        returns the loss (a detached 0-d tensor). ``sample_weight``: (m,) row weights, the
        loss being their weighted mean (or sum) of the per-row losses."""
        if sample_weight is not None and bool((sample_weight == 0).any()) and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.module.modules()):
            raise ValueError("rows of weight 0 take no part in fnmlp's batch statistics, but "
                             "nn.BatchNorm1d has no row weights: the twin cannot follow; drop "
                             "those rows instead")
        self.module.train()
        set_dropout_key(self.module, key)
        self.optimizer.zero_grad()
        value = self.compute_loss(self.module(x), y, sample_weight)
        value.backward()
        for max_norm in self.clip_norms:
            nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return value.detach()

    def compute_loss(self, prediction, y, sample_weight=None):
        """The loss module's value, or with ``sample_weight`` the weighted mean (or sum) of the
        per-row losses computed by ``torch.nn`` with ``reduction="none"``."""
        if sample_weight is None:
            return self.loss(prediction, y)
        per = self._per_element(prediction, y)
        per_row = per if per.dim() == 1 else (per.mean(dim=1) if self._mean else per.sum(dim=1))
        total = (per_row * sample_weight).sum()
        if not self._mean:
            return total
        return total / (sample_weight * self._divisor_share(y, prediction)).sum()

    def _divisor_share(self, y, prediction):
        """Each row's share of torch's "mean" divisor: for class labels, its class weight (0
        for ignored rows), as ``nn.CrossEntropyLoss``; else 1 (the loss's own rule)."""
        if isinstance(self._fnmlp_loss, CrossEntropy):
            return self._fnmlp_loss.targets(prediction.detach(), y)[1]
        return torch.ones(y.shape[0], dtype=prediction.dtype, device=prediction.device)

    def evaluate(self, x, y) -> float:
        """The loss in evaluation mode, as a Python float."""
        self.module.eval()
        with torch.no_grad():
            return self.loss(self.module(x), y).item()

    def params(self) -> Params:
        """Copies of the module's current parameters, as fnmlp parameters."""
        return from_torch(self.module)[1]

    def state(self) -> State:
        """Copies of the module's current running statistics, as an fnmlp state."""
        return from_torch(self.module)[2]
