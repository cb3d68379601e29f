"""Normalization primitives: layer normalization (over the features of each row) and batch
normalization (over the rows of each feature, with running statistics as state).

Shapes: x (m, n); scale ``weight`` and shift ``bias`` (n,). With x̂ the normalized input,
out = x̂·w + b, and d = dout, g = d·w:

LayerNorm (``nn.LayerNorm``), per row:
    μ = mean_j x_j,  r = 1/sqrt(var_j x_j + ε),  x̂ = (x - μ)·r
    dx = r·(g - mean_j g - x̂·mean_j(g·x̂)),  dw = sum_i d·x̂,  db = sum_i d

BatchNorm (``nn.BatchNorm1d``), per feature, over the k rows of non-zero weight (padding rows,
of weight 0, take no part; the rows that count are counted equally):
    training:   μ = mean_i x_i,  σ² = mean_i (x_i - μ)²,  r = 1/sqrt(σ² + ε),  x̂ = (x - μ)·r
                dx = r·(g - mean_i g - x̂·mean_i(g·x̂)),  dw = sum_i d·x̂,  db = sum_i d
                running_mean ← (1 - α)·running_mean + α·μ
                running_var  ← (1 - α)·running_var  + α·σ²·k/(k - 1)   (unbiased)
                α = momentum, or 1/(batches seen) with momentum=None (a cumulative average)
    evaluation: μ, σ² = the running statistics;  dx = g·r
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import cast

import torch
from torch import Tensor

from fnmlp._tree import pytree_dataclass
from fnmlp.nn._primitive import Primitive


@pytree_dataclass
class NormParams:
    """The learnable scale ``weight`` (n,) and shift ``bias`` (n,) of a normalization."""

    weight: Tensor
    bias: Tensor


def _affine_params(n: int, dtype, device) -> NormParams:
    """Scale 1, shift 0, as ``torch.nn`` starts them."""
    return NormParams(weight=torch.ones(n, dtype=dtype, device=device),
                      bias=torch.zeros(n, dtype=dtype, device=device))


def check_eps(eps, name: str = "eps") -> None:
    """Raise unless ``eps`` is a real number > 0; the message calls it ``name`` (the option the
    user wrote: ``Dense``'s ``norm_eps``)."""
    # the cast: typeshed's numbers.Real declares __lt__ and __le__ but no __gt__
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not cast(float, eps) > 0:
        raise ValueError(f"{name} must be a number > 0, got {eps!r}")


@dataclasses.dataclass(frozen=True)
class LayerNorm(Primitive):
    """Layer normalization of each row over its features, with a learnable scale and shift.

    Arguments:
        eps: added to the variance for stability (``nn.LayerNorm``'s ``eps``).
    """

    eps: float = 1e-5

    def __post_init__(self):
        check_eps(self.eps)

    def init(self, generator, n_in, dtype, device):
        return n_in, _affine_params(n_in, dtype, device)

    def forward(self, params: NormParams, x, state, context):
        out, mean, rstd = torch.native_layer_norm(x, (x.shape[1],), params.weight, params.bias,
                                                  self.eps)
        mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)  # float32 for half inputs on CUDA
        x_hat = (x - mean) * rstd
        return out, (x_hat, rstd), state

    def backward(self, params: NormParams, residual, dout, need_input_grad=True):
        x_hat, rstd = residual
        g = dout * params.weight
        dx = rstd * (g - g.mean(dim=1, keepdim=True)
                     - x_hat * (g * x_hat).mean(dim=1, keepdim=True))
        return dx, NormParams(weight=(dout * x_hat).sum(dim=0), bias=dout.sum(dim=0))


@pytree_dataclass
class BatchNormState:
    """Running statistics of a ``BatchNorm``: ``running_mean`` (n,), ``running_var`` (n,) and
    ``num_batches_tracked`` (0-d int64), as ``nn.BatchNorm1d``'s buffers."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor


@dataclasses.dataclass(frozen=True)
class BatchNorm(Primitive):
    """Batch normalization of each feature over the batch (``nn.BatchNorm1d`` semantics).

    Training uses the batch's statistics and returns updated running statistics (the state);
    evaluation (``train=False``) uses the running statistics.

    Arguments:
        momentum: weight α of the new batch in the running statistics; None for a cumulative
            average over all batches seen.
        eps: added to the variance for stability.
        affine: learn a scale and shift (params ``NormParams``; else no params).
        track_running_stats: keep running statistics (the state); without them evaluation
            uses batch statistics too.
    """

    momentum: float | None = 0.1
    eps: float = 1e-5
    affine: bool = True
    track_running_stats: bool = True
    min_training_rows = 2  # batch statistics: a variance needs two rows

    def __post_init__(self):
        check_eps(self.eps)
        if self.momentum is not None and (isinstance(self.momentum, bool) or not isinstance(
                self.momentum, numbers.Real) or not 0 <= self.momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1] or None, got "
                             f"{self.momentum!r}")
        for name in ("affine", "track_running_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def init(self, generator, n_in, dtype, device):
        return n_in, _affine_params(n_in, dtype, device) if self.affine else ()

    def init_state(self, n_in, dtype, device):
        if not self.track_running_stats:
            return ()
        return BatchNormState(
            running_mean=torch.zeros(n_in, dtype=dtype, device=device),
            running_var=torch.ones(n_in, dtype=dtype, device=device),
            num_batches_tracked=torch.zeros((), dtype=torch.int64, device=device))

    def forward(self, params, x, state, context):
        if not context.train and self.track_running_stats:
            rstd = torch.rsqrt(state.running_var + self.eps)
            x_hat = (x - state.running_mean) * rstd
            return self._scale_shift(params, x_hat), (x_hat, rstd, None, False), state
        mask = None
        if context.row_weight is None:
            count = x.shape[0]
            if context.train and count < 2:
                raise ValueError("BatchNorm needs at least 2 rows per batch in training, got 1")
            var, mean = torch.var_mean(x, dim=0, correction=0)
        else:
            mask = (context.row_weight != 0).to(x.dtype).unsqueeze(1)
            count = mask.sum()
            mean = (x * mask).sum(dim=0) / count
            var = ((x - mean) * mask).pow(2).sum(dim=0) / count
        rstd = torch.rsqrt(var + self.eps)
        x_hat = (x - mean) * rstd
        if context.train and self.track_running_stats:
            state = self._update_running_stats(state, mean, var, count)
        return self._scale_shift(params, x_hat), (x_hat, rstd, mask, True), state

    def backward(self, params, residual, dout, need_input_grad=True):
        x_hat, rstd, mask, batch_statistics = residual
        g = dout * params.weight if self.affine else dout
        dx = None
        if need_input_grad and not batch_statistics:
            dx = g * rstd
        elif need_input_grad and mask is None:
            dx = rstd * (g - g.mean(dim=0) - x_hat * (g * x_hat).mean(dim=0))
        elif need_input_grad:
            count = mask.sum()
            mean_g = (g * mask).sum(dim=0) / count
            mean_gx = (g * x_hat * mask).sum(dim=0) / count
            dx = mask * rstd * (g - mean_g - x_hat * mean_gx)
        if not self.affine:
            return dx, ()
        return dx, NormParams(weight=(dout * x_hat).sum(dim=0), bias=dout.sum(dim=0))

    def _scale_shift(self, params, x_hat: Tensor) -> Tensor:
        return torch.addcmul(params.bias, x_hat, params.weight) if self.affine else x_hat

    def _update_running_stats(self, state: BatchNormState, mean, var, count) -> BatchNormState:
        tracked = state.num_batches_tracked + 1
        alpha: Tensor | float
        if self.momentum is None:
            alpha = 1 / tracked.to(mean.dtype)
        else:
            alpha = self.momentum
        unbiased = var * (count / (count - 1))
        return BatchNormState(
            running_mean=torch.lerp(state.running_mean, mean, alpha),
            running_var=torch.lerp(state.running_var, unbiased, alpha),
            num_batches_tracked=tracked)
