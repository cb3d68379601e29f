"""The affine primitive z = x @ W.T + b, in ``nn.Linear``'s layout.

Shapes: x (m, n_in), W (n_out, n_in), b (n_out,), z (m, n_out). Keeping W as (out, in) makes the
``nn.Module`` twin a plain copy and lets BLAS read W.T as a transposed view without copying.

    forward:  z = b + x @ W.T          (one ``addmm``, as ``nn.Linear``)
    backward: dx = dz @ W  (m, n_in),  dW = dz.T @ x  (n_out, n_in),  db = sum_i dz_i  (n_out,)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp._tree import pytree_dataclass
from fnmlp.nn._init import get_initializer
from fnmlp.nn._primitive import Primitive


@pytree_dataclass
class LinearParams:
    """``weight`` (n_out, n_in) and ``bias`` (n_out,)."""

    weight: Tensor
    bias: Tensor


@dataclasses.dataclass(frozen=True)
class Linear(Primitive):
    """The affine map to ``units`` outputs.

    Arguments:
        units: the output width n_out.
        initializer: how ``init`` draws W and b (see ``MLP.init``); None takes the model's.
    """

    units: int
    initializer: str | None = None
    penalized: ClassVar[tuple[str, ...]] = ("weight",)  # not the bias

    def __post_init__(self):
        _validate.check_positive_int(self.units, "units")
        if self.initializer is not None:
            get_initializer(self.initializer)

    def out_features(self, n_in):
        return self.units

    def init(self, generator, n_in, dtype, device):
        weight, bias = get_initializer(self.initializer or "torch")(n_in, self.units, generator,
                                                                    dtype)
        return self.units, LinearParams(weight.to(device), bias.to(device))

    def forward(self, params: LinearParams, x, state, context):
        # nn.Linear's own call (addmm with the transposed weight), one call from Python
        return torch.nn.functional.linear(x, params.weight, params.bias), x, state

    def backward(self, params: LinearParams, x, dz, need_input_grad=True):
        dx = dz @ params.weight if need_input_grad else None
        return dx, LinearParams(weight=dz.t() @ x, bias=dz.sum(dim=0))
