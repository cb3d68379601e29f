"""The affine primitive z = x @ W.T + b, in ``nn.Linear``'s layout.

Shapes: x (m, n_in), W (n_out, n_in), b (n_out,), z (m, n_out). Keeping W as (out, in) makes the
``nn.Module`` twin a plain copy and lets BLAS read W.T as a transposed view without copying.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnmlp._norm import LayerNormParams
from fnmlp._tree import pytree_dataclass


@pytree_dataclass
class DenseParams:
    """Parameters of one dense layer: ``weight`` (n_out, n_in), ``bias`` (n_out,) and, for a
    layer with ``layer_norm=True``, the norm's ``LayerNormParams`` (else None)."""

    weight: Tensor
    bias: Tensor
    norm: LayerNormParams | None = None


def dense_forward(params: DenseParams, x: Tensor) -> Tensor:
    """z = b + x @ W.T, computed as ``nn.Linear`` does (one ``addmm``)."""
    return torch.addmm(params.bias, x, params.weight.t())


def dense_backward(
    params: DenseParams, x: Tensor, dz: Tensor, *, need_input_grad: bool = True
) -> tuple[Tensor | None, DenseParams]:
    """Cotangents of (x, W, b) from dz (m, n_out).

    dx = dz @ W       (m, n_in), skipped for the first layer
    dW = dz.T @ x     (n_out, n_in)
    db = sum_i dz_i   (n_out,)
    """
    dx = dz @ params.weight if need_input_grad else None
    return dx, DenseParams(weight=dz.t() @ x, bias=dz.sum(dim=0))
