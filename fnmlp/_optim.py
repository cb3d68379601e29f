"""Functional optimizers: ``init(params) -> state`` and ``update(params, grads, state) ->
(params, state)``. Nothing is mutated; hyper-parameters that may change during training (the
learning rate) live in the state as 0-d tensors, so a compiled step never recompiles for them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fnmlp._tree import pytree_dataclass, tree_leaves, tree_map
from fnmlp._validate import check_learning_rate


@pytree_dataclass
class SGDState:
    """``learning_rate``: 0-d tensor on the parameters' device."""

    learning_rate: Tensor


@dataclasses.dataclass(frozen=True)
class SGD:
    """Plain stochastic gradient descent, p ← p - lr · g, as ``torch.optim.SGD`` computes it."""

    lr: float | Tensor

    def __post_init__(self):
        check_learning_rate(self.lr)

    @property
    def structure(self) -> tuple:
        """What a compiled update depends on (the learning rate is in the state, not here)."""
        return (type(self),)

    def init(self, params) -> SGDState:
        like = tree_leaves(params)[0]
        return SGDState(learning_rate=_scalar(self.lr, like))

    def update(self, params, grads, state: SGDState):
        neg_lr = -state.learning_rate
        # addcmul is one fused multiply-add like torch.optim's add(alpha=-lr), and avoids the
        # add-with-alpha form that inductor has miscompiled (see PITFALLS: alpha dropped).
        new_params = tree_map(lambda p, g: torch.addcmul(p, g, neg_lr), params, grads)
        return new_params, state

    def to_torch(self, parameters) -> torch.optim.SGD:
        """The matching ``torch.optim.SGD`` over ``parameters`` (for the ``nn.Module`` twin)."""
        return torch.optim.SGD(parameters, lr=self.lr)

    def with_learning_rate(self, state: SGDState, lr: float | Tensor) -> SGDState:
        """A state whose learning rate is ``lr``; no recompile of a compiled step follows."""
        check_learning_rate(lr)
        return SGDState(learning_rate=_scalar(lr, state.learning_rate))


def sgd(lr: float | Tensor) -> SGD:
    """SGD with learning rate ``lr`` (a positive float or a 0-d tensor)."""
    return SGD(lr)


def _scalar(value: float | Tensor, like: Tensor) -> Tensor:
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(value, Tensor):
        return value.detach().to(dtype=dtype, device=like.device).clone()
    return torch.tensor(value, dtype=dtype, device=like.device)
