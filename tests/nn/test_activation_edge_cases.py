"""Activations at the edges: zero-width inputs, and NaN/±inf inputs and cotangents against
autograd."""

import math

import pytest
import torch

import fnmlp
from fnmlp.nn import get_activation
from fnmlp.nn._primitive import Context

F64 = torch.float64


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_zero_width_inputs_work(name):
    activation = get_activation(name)
    z = torch.zeros(3, 0, dtype=F64)
    a, residual, _ = activation.forward((), z, (), Context())
    dz, _ = activation.backward((), residual, torch.zeros(3, 0, dtype=F64))
    assert a.shape == dz.shape == (3, 0)


NON_FINITE = [math.nan, math.inf, -math.inf, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("name", [n for n in fnmlp.nn.activation_names() if n != "elu"])
def test_backward_at_nan_and_inf_matches_autograd(name):
    """NaN and ±inf inputs and cotangents: the explicit rule gives what autograd gives (NaN
    where it gives NaN). ELU is left out: its autograd disagrees with itself at NaN (see
    test_elu_at_nan_is_documented)."""
    from fnmlp.interop import _registry

    activation = get_activation(name)
    module = _registry.module_for(activation, (), (), 0)
    values = torch.tensor(NON_FINITE, dtype=F64)
    z = values.repeat(len(NON_FINITE), 1).t().contiguous().requires_grad_(True)
    da = values.repeat(len(NON_FINITE), 1)
    (expected,) = torch.autograd.grad(module(z), z, da)
    a, residual, _ = activation.forward((), z.detach(), (), Context())
    got, _ = activation.backward((), residual, da)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15, equal_nan=True)


def test_elu_at_nan_is_documented():
    """fnmlp's ELU passes NaN through its negative branch (da·α·exp(NaN) = NaN), whatever the
    cotangent; torch's own autograd gives NaN or the cotangent depending on the kernel."""
    elu = fnmlp.ELU(0.5)
    z = torch.tensor([[math.nan, 1.0]], dtype=F64)
    _, residual, _ = elu.forward((), z, (), Context())
    got, _ = elu.backward((), residual, torch.ones_like(z))
    assert math.isnan(got[0, 0]) and got[0, 1] == 1.0
