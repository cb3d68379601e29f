"""Layer normalization over the features of each row, with a learnable scale and shift.

Shapes: z (m, n), weight and bias (n,). Forward (``nn.LayerNorm``'s):
    μ = mean_j z_j,  r = 1/sqrt(var_j z_j + ε),  ẑ = (z - μ)·r,  out = ẑ·w + b
Backward, with d = dout:
    dw = sum_i d·ẑ,  db = sum_i d,  g = d·w,
    dz = r·(g - mean_j g - ẑ·mean_j(g·ẑ))
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnmlp._tree import pytree_dataclass


@pytree_dataclass
class LayerNormParams:
    """``weight`` (n,) and ``bias`` (n,)."""

    weight: Tensor
    bias: Tensor


def layer_norm_forward(params: LayerNormParams, z: Tensor, eps: float):
    out, mean, rstd = torch.native_layer_norm(z, (z.shape[1],), params.weight, params.bias, eps)
    mean, rstd = mean.to(z.dtype), rstd.to(z.dtype)  # float32 for half inputs on CUDA
    z_hat = (z - mean) * rstd
    return out, (z_hat, rstd)


def layer_norm_backward(params: LayerNormParams, residual, dout: Tensor):
    z_hat, rstd = residual
    g = dout * params.weight
    dz = rstd * (g - g.mean(dim=1, keepdim=True) - z_hat * (g * z_hat).mean(dim=1, keepdim=True))
    return dz, LayerNormParams(weight=(dout * z_hat).sum(dim=0), bias=dout.sum(dim=0))
